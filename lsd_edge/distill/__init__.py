"""Distillation: the pure losses, their assembly into a stage objective, the teacher (online or cached), regenerated data."""
