"""The coordinator ↔ stage protocol: binary frames (``frames``), the messages they carry (``messages``) and
per-sequence sampling settings (``sampling``). Plain data only: importing it never loads llama.cpp."""
