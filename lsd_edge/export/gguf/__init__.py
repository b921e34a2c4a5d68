"""The GGUF export for llama.cpp, Ollama and LM Studio: the LLM with its tokenizer and chat template, the mmproj file, the parity gate through llama-cpp-python, the pipeline with the Modelfile."""
