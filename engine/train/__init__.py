"""Training a transform against a frozen teacher: objectives, trainer, data,
models (teacher, surrogate, tiny test models) and the demo run."""
