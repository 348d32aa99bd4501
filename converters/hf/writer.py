"""HF folder -> one full-precision GGUF, streamed tensor by tensor.

``GGUFWriter.add_tensor`` keeps every tensor in memory until the file is written; instead the plan (names,
shapes, types) is registered with ``add_tensor_info``, the header, metadata and tensor table are written,
and then each tensor is read, rearranged, converted and written on its own with ``write_tensor_data``.
Peak memory stays near the largest single tensor, whatever the model's size.
"""

from __future__ import annotations

import errno
import logging
import pathlib
import shutil
import time
from collections.abc import Callable

import gguf

from chatloop import progress
from converters.errors import ConvertError
from converters.hf.archs import NP_TYPES, OUT_TYPES, OutTensor, converter_for
from converters.hf.safetensors_lazy import Checkpoint
from converters.hf.source import model_name_for
from converters.hf.tokenizer import load_vocab, read_json_object

log = logging.getLogger(__name__)


def read_config(folder: pathlib.Path) -> dict:
    config = read_json_object(folder / "config.json")
    if config is None:
        raise ConvertError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    return config


def convert_hf_to_gguf(
    folder: str | pathlib.Path, out_path: str | pathlib.Path, intermediate: str = "auto", *, name: str | None = None
) -> pathlib.Path:
    """Write the whole model in ``folder`` to ``out_path`` as a GGUF.

    ``intermediate`` is the precision of the 2-D weights: ``f32``, ``f16``, ``bf16``, or ``auto`` (bf16 for a
    bf16 checkpoint, else f16, as llama.cpp's converter guesses). Norms, biases and other 1-D tensors are
    always float32, as llama.cpp expects.
    """
    folder, out_path = pathlib.Path(folder), pathlib.Path(out_path)
    config = read_config(folder)
    cls = converter_for(config)
    ckpt = Checkpoint(folder)
    model = cls(config, ckpt)
    if intermediate == "auto":
        intermediate = "bf16" if ckpt.main_dtype() == "BF16" else "f16"
    if intermediate not in OUT_TYPES:
        raise ConvertError(f"intermediate precision {intermediate!r}: expected one of auto, {', '.join(OUT_TYPES)}")
    weights_type, file_type = OUT_TYPES[intermediate]
    vocab = load_vocab(folder, model.n_vocab)
    tensors = model.plan(weights_type)
    title = name or model_name_for(folder)

    def metadata(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(title)
        model.set_gguf_parameters(w)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.add_to_gguf(w)

    log.info(
        "%s (%s -> %s, %d layers): writing %s at %s",
        title,
        model.hf_arch,
        model.arch_name,
        model.n_layer,
        out_path.name,
        intermediate,
    )
    write_gguf(out_path, model.arch_name, metadata, tensors)
    return out_path


def write_gguf(
    path: pathlib.Path, arch: str, metadata: Callable[[gguf.GGUFWriter], None], tensors: list[OutTensor]
) -> None:
    """Write a GGUF whose tensors are produced one at a time, in ``tensors`` order."""
    total = sum(t.nbytes for t in tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < total:
        raise ConvertError(
            f"{path.parent}: {total / 1e9:.2f} GB needed for {path.name} but only {free / 1e9:.2f} GB free"
        )
    writer = gguf.GGUFWriter(path, arch)
    tensor_bar = progress.bar(total, f"converting to {path.name}", unit="B", unit_scale=True)
    try:
        metadata(writer)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, NP_TYPES[t.ggml_type], t.nbytes, raw_dtype=t.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        start = last = time.monotonic()
        done = 0
        for i, t in enumerate(tensors):
            data = t.produce()
            if data.shape != tuple(t.shape) or data.dtype != NP_TYPES[t.ggml_type]:
                raise ConvertError(
                    f"tensor {t.name}: produced {data.dtype} {list(data.shape)}, planned {list(t.shape)}"
                )
            writer.write_tensor_data(data)
            # NOTE: dropping the array here also unmaps the source file region it came from.
            del data
            done += t.nbytes
            tensor_bar.update(t.nbytes)
            now = time.monotonic()
            if now - last > 5 or i == len(tensors) - 1:
                log.info(
                    "wrote %d/%d tensors, %.2f/%.2f GB (%.0f s)",
                    i + 1,
                    len(tensors),
                    done / 1e9,
                    total / 1e9,
                    now - start,
                )
                last = now
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ConvertError(f"{path.parent}: disk full while writing {path.name} ({total / 1e9:.2f} GB)") from exc
        raise
    finally:
        tensor_bar.close()
        writer.close()
