"""A tensor-free copy of a GGUF's metadata (vocabulary, merges, chat template): what a coordinator needs to
tokenize, without the weights."""

from __future__ import annotations

import pathlib
import tempfile

import gguf


def vocab_only_gguf(path: pathlib.Path) -> bytes:
    reader = gguf.GGUFReader(path)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "vocab.gguf"
        writer = gguf.GGUFWriter(out, arch=arch)
        for f in reader.fields.values():
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
                continue
            vtype = f.types[0]
            writer.add_key_value(
                f.name, f.contents(), vtype, f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        return out.read_bytes()
