"""The llama.cpp shared libraries: backend start-up and the few ggml symbols the bindings leave out.

llama-cpp-python binds libllama; reading a graph node inside the eval callback needs three functions of
libggml-base (``ggml_get_name``, ``ggml_nbytes``, ``ggml_backend_tensor_get``), bound here once.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pathlib
import threading

import llama_cpp as llama

log = logging.getLogger(__name__)

_LIB_DIR = pathlib.Path(llama.__file__).parent / "lib"
_init_lock = threading.Lock()
_initialised = False


def _load_ggml_base() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_LIB_DIR / "libggml-base.so"))
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    return lib


ggml_base = _load_ggml_base()

_NO_LOG = llama.llama_log_callback(lambda level, text, user_data: None)


def ensure_backend(quiet: bool = True) -> None:
    """Initialise llama.cpp's backends once per process (idempotent, thread-safe)."""
    global _initialised
    with _init_lock:
        if _initialised:
            return
        if quiet and os.environ.get("CHATLOOP_LLAMA_LOG", "") not in ("1", "true"):
            # NOTE: llama.cpp logs every tensor at load; the callback object lives at module level for as long as C may call it.
            llama.llama_log_set(_NO_LOG, None)
        _load_cpu_variants()
        llama.llama_backend_init()
        _initialised = True


def _load_cpu_variants() -> None:
    """Register the CPU backend variants of a portable build (GGML_BACKEND_DL, one libggml-cpu-<arch>.so per
    SIMD level, as the Docker images build it): llama.cpp then picks the best one for this CPU at run time.
    A native build links its CPU backend directly and ships no variants, so this does nothing there."""
    if not any(_LIB_DIR.glob("libggml-cpu-*.so")):
        return
    # NOTE: libggml.so.0 is the copy libllama links against; registering in libggml.so would be invisible to it.
    ggml = ctypes.CDLL(str(_LIB_DIR / "libggml.so.0"))
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load_all_from_path(str(_LIB_DIR).encode())


def numa_init(strategy: str) -> None:
    """Apply llama.cpp's NUMA strategy ("distribute", "isolate", "numactl"); call before loading a model."""
    values = {"distribute": 1, "isolate": 2, "numactl": 3}
    if strategy not in values:
        raise ValueError(f"unknown NUMA strategy {strategy!r}; expected one of {sorted(values)}")
    llama.llama_numa_init(values[strategy])


def system_info() -> str:
    ensure_backend()
    return llama.llama_print_system_info().decode("utf-8", "replace").strip()


def simd_features() -> list[str]:
    """The SIMD extensions llama.cpp's CPU backend detected at run time (names as in its system info)."""
    features = set()
    for part in system_info().split("|"):
        key, sep, value = part.rpartition("=")
        if sep and value.strip() == "1":
            features.add(key.split(":")[-1].strip())
    return sorted(features)
