"""Running a model: the one decode loop (`textgen`), the `Runner` and `Answerer` protocols, the PyTorch and
ONNX runners; `lsd_edge.infer.load_runner` picks one for a folder."""
