"""One converter class per model family, registered by HF architecture name.

The shape of llama.cpp's ``convert_hf_to_gguf.py`` (``@ModelBase.register(...)`` on a class with
``model_arch``, ``set_gguf_parameters`` and ``modify_tensors``), reduced to what the supported families
need and planned before any weight is read: every output tensor is known (name, shape, type) up front,
so the GGUF header can be written first and the data streamed one tensor at a time.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import gguf
import numpy as np

from converters.errors import ConvertError
from converters.hf.safetensors_lazy import Checkpoint, TensorRef, to_f32

log = logging.getLogger(__name__)

F32 = gguf.GGMLQuantizationType.F32
F16 = gguf.GGMLQuantizationType.F16
BF16 = gguf.GGMLQuantizationType.BF16
# Intermediate precision -> (tensor type of 2-D weights, general.file_type)
OUT_TYPES = {
    "f32": (F32, gguf.LlamaFileType.ALL_F32),
    "f16": (F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
NP_TYPES = {F32: np.dtype(np.float32), F16: np.dtype(np.float16), BF16: np.dtype(np.uint16)}

_REGISTRY: dict[str, type[HFModel]] = {}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_CHUNK = 1 << 22  # elements converted at a time: bounds the float32 temporaries of a dtype change


def register(*hf_archs: str) -> Callable[[type[HFModel]], type[HFModel]]:
    """Class decorator: ``@register("LlamaForCausalLM", ...)`` makes the class convert those architectures."""

    def wrap(cls: type[HFModel]) -> type[HFModel]:
        for name in hf_archs:
            _REGISTRY[name] = cls
        return cls

    return wrap


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def converter_for(config: dict) -> type[HFModel]:
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not archs:
        raise ConvertError(
            f"config.json names no architecture ('architectures'); supported: {', '.join(supported_architectures())}"
        )
    for name in archs:
        if name in _REGISTRY:
            return _REGISTRY[name]
    raise ConvertError(f"architecture {archs[0]} is not supported; supported: {', '.join(supported_architectures())}")


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output GGUF, produced on demand."""

    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # numpy order (rows last-but-one, columns last)
    ggml_type: gguf.GGMLQuantizationType
    produce: Callable[[], np.ndarray]  # the data, in NP_TYPES[ggml_type]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * NP_TYPES[self.ggml_type].itemsize


def cast(data: np.ndarray, stored: str, out: gguf.GGMLQuantizationType) -> np.ndarray:
    """Stored data (F32, F16 or BF16 bits) as ``out``, in bounded chunks so a large tensor never needs a
    full float32 copy next to the result."""
    if (stored, out) in (("F32", F32), ("F16", F16), ("BF16", BF16)):
        return np.ascontiguousarray(data)
    flat_in = data.reshape(-1)
    result = np.empty(flat_in.shape, dtype=NP_TYPES[out])
    for lo in range(0, flat_in.size, _CHUNK):
        f32 = to_f32(flat_in[lo : lo + _CHUNK], stored)
        if out == F32:
            result[lo : lo + _CHUNK] = f32
        elif out == F16:
            result[lo : lo + _CHUNK] = f32.astype(np.float16)
        else:
            result[lo : lo + _CHUNK] = f32_to_bf16(f32)
    return result.reshape(data.shape)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, NaNs kept quiet: ggml's ``ggml_compute_fp32_to_bf16``."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # NOTE: uint32 wraps only for NaN bit patterns, which the where() below replaces anyway.
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, ((u >> 16) | np.uint32(64)).astype(np.uint16), rounded)


def _file_order(bid: int | None, name: str) -> tuple[int, int, str]:
    """Embedding, then blocks in layer order, then the head: the same file however the checkpoint was
    sharded, and in the order llama.cpp's own converter writes."""
    if bid is not None:
        return (1, bid, name)
    return (0, 0, name) if name.startswith("token_embd") else (2, 0, name)


class HFModel:
    """Base converter: reads config.json's hyper-parameters, maps and checks tensors, writes metadata."""

    model_arch: ClassVar[gguf.MODEL_ARCH]
    defaults: ClassVar[dict] = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048}
    # HF tensors of every layer (after ``model.layers.N.``) the family always has.
    layer_tensors: ClassVar[tuple[str, ...]] = (
        "input_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    )
    # Never converted: buffers some checkpoints save next to the weights.
    skipped = re.compile(r"rotary_emb\.inv_freq$")

    def __init__(self, config: dict, ckpt: Checkpoint) -> None:
        self.hf_arch = next(a for a in config["architectures"] if _REGISTRY.get(a) is type(self))
        self.hparams = hp = {**self.defaults, **config}
        needed = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        missing = [k for k in needed if not isinstance(hp.get(k), int) or hp[k] <= 0]
        if missing:
            raise ConvertError(f"config.json: {', '.join(missing)} missing or not a positive integer")
        act = hp.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConvertError(f"config.json: hidden_act {act!r} is not supported for {self.hf_arch} (only silu)")
        self.ckpt = ckpt
        self.n_layer: int = hp["num_hidden_layers"]
        self.n_embd: int = hp["hidden_size"]
        self.n_head: int = hp["num_attention_heads"]
        self.n_head_kv: int = hp.get("num_key_value_heads") or self.n_head
        self.n_ff: int = hp["intermediate_size"]
        self.n_vocab: int = hp["vocab_size"]
        self.head_dim: int = hp.get("head_dim") or self.n_embd // self.n_head
        if self.n_head % self.n_head_kv or self.head_dim % 2:
            raise ConvertError(
                f"config.json: {self.n_head} attention heads, {self.n_head_kv} KV heads and head size "
                f"{self.head_dim} do not form a valid attention layout"
            )
        self.tied = bool(hp.get("tie_word_embeddings", False))
        if "lm_head.weight" not in ckpt and not self.tied:
            log.warning("no lm_head.weight in the checkpoint: the output layer reuses the token embedding")
            self.tied = True
        self.tensor_map = gguf.get_tensor_name_map(self.model_arch, self.n_layer)

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.model_arch]

    # -- metadata ----------------------------------------------------------------------------------------

    def set_gguf_parameters(self, w: gguf.GGUFWriter) -> None:
        hp = self.hparams
        w.add_block_count(self.n_layer)
        w.add_context_length(int(hp["max_position_embeddings"]))
        w.add_embedding_length(self.n_embd)
        w.add_feed_forward_length(self.n_ff)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_rope_freq_base(float(hp["rope_theta"]))
        w.add_layer_norm_rms_eps(float(hp["rms_norm_eps"]))
        if hp.get("head_dim") is not None:
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)

    def rope_scaling(self) -> tuple[str | None, dict]:
        rs = self.hparams.get("rope_scaling") or {}
        return rs.get("rope_type", rs.get("type")), rs

    # -- tensors -----------------------------------------------------------------------------------------

    def expected_shape(self, suffix: str) -> tuple[int, ...] | None:
        """Shape config.json implies for a tensor (``suffix`` without the ``model.layers.N.`` prefix)."""
        q, kv, e, ff = self.n_head * self.head_dim, self.n_head_kv * self.head_dim, self.n_embd, self.n_ff
        return {
            "model.embed_tokens.weight": (self.n_vocab, e),
            "lm_head.weight": (self.n_vocab, e),
            "model.norm.weight": (e,),
            "input_layernorm.weight": (e,),
            "post_attention_layernorm.weight": (e,),
            "self_attn.q_proj.weight": (q, e),
            "self_attn.k_proj.weight": (kv, e),
            "self_attn.v_proj.weight": (kv, e),
            "self_attn.o_proj.weight": (e, q),
            "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.bias": (e,),
            "self_attn.q_norm.weight": (self.head_dim,),
            "self_attn.k_norm.weight": (self.head_dim,),
            "mlp.gate_proj.weight": (ff, e),
            "mlp.up_proj.weight": (ff, e),
            "mlp.down_proj.weight": (e, ff),
        }.get(suffix)

    def required(self) -> list[str]:
        names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if self.tied else ["lm_head.weight"])
        names += [f"model.layers.{i}.{s}" for i in range(self.n_layer) for s in self.layer_tensors]
        return names

    def modify_tensor(self, name: str, data: np.ndarray) -> np.ndarray:
        """Rearrange one HF tensor (stored dtype, any of F32/F16/BF16 bits) for llama.cpp."""
        return data

    def extra_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Tensors computed from the config rather than read (float32)."""
        return iter(())

    def plan(self, weights: gguf.GGMLQuantizationType) -> list[OutTensor]:
        """Every output tensor in file order, checked against config.json, nothing read yet."""
        missing = [n for n in self.required() if n not in self.ckpt]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConvertError(f"tensor {missing[0]} is missing from the checkpoint{more}")
        out = [OutTensor(n, d.shape, F32, lambda d=d: d) for n, d in self.extra_tensors()]
        body: list[tuple[tuple, OutTensor]] = []
        for name, ref in self.ckpt.tensors.items():
            if self.skipped.search(name) or (self.tied and name == "lm_head.weight"):
                continue
            m = _LAYER.match(name)
            bid, suffix = (int(m.group(1)), m.group(2)) if m else (None, name)
            if bid is not None and bid >= self.n_layer:
                raise ConvertError(f"tensor {name}: layer {bid} but config.json has {self.n_layer} layers")
            new_name = self.tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
            if new_name is None:
                raise ConvertError(f"tensor {name} has no place in a {self.arch_name} GGUF ({self.hf_arch})")
            want = self.expected_shape(suffix)
            if want is not None and ref.shape != want:
                raise ConvertError(f"tensor {name} has shape {list(ref.shape)} but config.json implies {list(want)}")
            n_dims = len(ref.shape)
            is_f32 = n_dims <= 1 or new_name.endswith("_norm.weight") or not new_name.endswith(".weight")
            ttype = F32 if is_f32 else weights
            body.append((_file_order(bid, new_name), OutTensor(new_name, ref.shape, ttype, self._producer(ref, ttype))))
        out += [t for _, t in sorted(body, key=lambda x: x[0])]
        return out

    def _producer(self, ref: TensorRef, ttype: gguf.GGMLQuantizationType) -> Callable[[], np.ndarray]:
        def produce() -> np.ndarray:
            return cast(self.modify_tensor(ref.name, ref.raw()), ref.dtype, ttype)

        return produce


@register("LlamaForCausalLM", "MistralForCausalLM")
class LlamaModel(HFModel):
    """Llama 2/3/3.1/3.2, SmolLM, TinyLlama, Mistral: llama.cpp's ``llama`` graph."""

    model_arch = gguf.MODEL_ARCH.LLAMA

    def __init__(self, config: dict, ckpt: Checkpoint) -> None:
        super().__init__(config, ckpt)
        extra = []
        if self.hparams.get("attention_bias"):
            extra += [
                "self_attn.q_proj.bias",
                "self_attn.k_proj.bias",
                "self_attn.v_proj.bias",
                "self_attn.o_proj.bias",
            ]
        if self.hparams.get("mlp_bias"):
            raise ConvertError("config.json: mlp_bias is not supported by llama.cpp's llama graph")
        self.layer_tensors = (*type(self).layer_tensors, *extra)
        window = self.hparams.get("sliding_window")
        if window and window < int(self.hparams["max_position_embeddings"]):
            log.warning("sliding_window %d is ignored: llama.cpp runs this architecture with full attention", window)

    def set_gguf_parameters(self, w: gguf.GGUFWriter) -> None:
        super().set_gguf_parameters(w)
        w.add_vocab_size(self.n_vocab)
        w.add_rope_dimension_count(self.head_dim)
        kind, rs = self.rope_scaling()
        if kind == "linear" and "factor" in rs:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rs["factor"]))
        elif kind == "yarn" and "factor" in rs:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(rs["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
        elif kind not in (None, "default", "llama3"):
            log.warning("rope_scaling type %r is not converted; long contexts may degrade", kind)

    @staticmethod
    def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
        """HF stores Q/K rows for rotate-half RoPE; llama.cpp's llama graph rotates interleaved pairs.
        From ``LlamaModel.permute`` in llama.cpp's convert_hf_to_gguf.py."""
        if n_head_kv is not None and n_head != n_head_kv:
            n_head = n_head_kv
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    def modify_tensor(self, name: str, data: np.ndarray) -> np.ndarray:
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return self.permute(data, self.n_head, self.n_head)
        if name.endswith(("k_proj.weight", "k_proj.bias")):
            return self.permute(data, self.n_head, self.n_head_kv)
        return data

    def extra_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        kind, rs = self.rope_scaling()
        if kind != "llama3":
            return
        # Llama 3.1 frequency scaling as per-dimension factors (rope_freqs.weight), computed exactly as
        # llama.cpp's LlamaModel.generate_extra_tensors does.
        base = float(self.hparams["rope_theta"])
        dim = self.head_dim
        freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        factor = rs.get("factor", 8.0)
        low_freq_factor = rs.get("low_freq_factor", 1.0)
        high_freq_factor = rs.get("high_freq_factor", 4.0)
        old_context_len = rs.get(
            "original_max_position_embeddings", self.hparams.get("original_max_position_embeddings", 8192)
        )
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < high_freq_wavelen:
                factors.append(1.0)
            elif wavelen > low_freq_wavelen:
                factors.append(factor)
            else:
                smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", np.array(factors, dtype=np.float32)


@register("Qwen2ForCausalLM")
class Qwen2Model(HFModel):
    """Qwen2/2.5: Q/K/V biases; llama.cpp rotates NEOX-style, so no row permutation."""

    model_arch = gguf.MODEL_ARCH.QWEN2
    defaults: ClassVar[dict] = {**HFModel.defaults, "max_position_embeddings": 32768}
    layer_tensors = (*HFModel.layer_tensors, "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")

    def set_gguf_parameters(self, w: gguf.GGUFWriter) -> None:
        super().set_gguf_parameters(w)
        kind, rs = self.rope_scaling()
        if kind == "yarn" and "factor" in rs:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(rs["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
        elif kind not in (None, "default"):
            log.warning("rope_scaling type %r is not converted; long contexts may degrade", kind)


@register("Qwen3ForCausalLM")
class Qwen3Model(Qwen2Model):
    """Qwen3: RMS norms on Q and K per head instead of Q/K/V biases; explicit head_dim."""

    model_arch = gguf.MODEL_ARCH.QWEN3
    defaults: ClassVar[dict] = {**HFModel.defaults, "max_position_embeddings": 40960}
    layer_tensors = (*HFModel.layer_tensors, "self_attn.q_norm.weight", "self_attn.k_norm.weight")
