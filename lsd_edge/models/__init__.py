"""Models: build, load and save LLaVA models; their groups, facts and token rules (`tokens` is torch-free)."""
