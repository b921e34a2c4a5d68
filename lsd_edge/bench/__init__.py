"""Bench: teacher vs student vs ONNX student measured in worker processes, against the machine's roofline; the loss bench."""
