"""Judging a defense: distillation attacks (losses and adaptive attackers),
the students they train, the evaluation grid and its report."""
