"""Model conversion: Hugging Face models and GGUF files into per-stage GGUF files plus a manifest."""
