"""Hugging Face checkpoints (a model id or a local folder) into one full-precision GGUF.

``resolve_source`` finds or downloads the folder; ``convert_hf_to_gguf`` streams it into a GGUF that
``converters.convert`` then slices and quantizes with llama.cpp. No torch and no transformers: safetensors
are read through memory maps and tokenizers from their JSON or protobuf files.
"""

from __future__ import annotations

from converters.hf.archs import supported_architectures
from converters.hf.source import HFSource, resolve_source
from converters.hf.writer import convert_hf_to_gguf

__all__ = ["HFSource", "convert_hf_to_gguf", "resolve_source", "supported_architectures"]
