"""Training: the one stage loop, its setup and resume state, the pipeline that chains stages, ablation, processes, memory."""
