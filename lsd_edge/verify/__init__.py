"""`lsd-edge verify`: every runtime and variant an export holds, judged by accuracy against PyTorch."""
