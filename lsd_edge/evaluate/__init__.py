"""Evaluation: the one exact-match scorer (`score`, torch-free) and batched greedy answers (`greedy`)."""
