"""The ONNX Runtime side of the runtime, torch-free: the export layout, prompts, pixels and the runner."""
