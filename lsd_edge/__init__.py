"""lsd-edge: distill a LLaVA-style vision-language model into a small one, export it, bench it, demo it."""

__version__ = "0.1.0"
