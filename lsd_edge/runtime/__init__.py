"""Running a model: the one decode loop (`textgen`), the `Runner` protocol, the PyTorch and ONNX runners."""
