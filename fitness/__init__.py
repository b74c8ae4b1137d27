"""Fitness: lm-eval scoring of in-memory models, objectives, local tasks and the offline zoo."""
