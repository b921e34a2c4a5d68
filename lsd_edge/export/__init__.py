"""Export: the ONNX graphs, their quantized variants, the parity gate against PyTorch, the export pipeline."""
