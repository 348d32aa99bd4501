"""ChatLoop: serve one LLM from a chain of CPU-only llama.cpp stages."""

from __future__ import annotations

__version__ = "0.1.0"
