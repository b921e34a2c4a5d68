"""Export: the ONNX pipeline (`onnx/`) and the GGUF pipeline (`gguf/`), side by side over what both share (`gated`)."""
