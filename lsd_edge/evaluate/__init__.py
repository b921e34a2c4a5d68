"""Evaluation: the one exact-match scorer (`score`) and the one accuracy path over it (`accuracy`),
both torch-free; a model folder or the model in training scored on eval data (`greedy`)."""
