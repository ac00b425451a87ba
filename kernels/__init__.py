"""Kernels behind cmiguard's hot paths and their pure-torch twins (``reference``)."""
