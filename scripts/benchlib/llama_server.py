"""llama.cpp's own ``llama-server`` as the baseline: find it, build it once from the same llama.cpp the engine
runs, and run it on loopback."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

from benchlib.children import Children, tail, wait_http
from benchlib.omp import omp_env
from chatloop.demo import cache_dir
from chatloop.http_util import free_port
from chatloop.launcher import ChildProcess

log = logging.getLogger("bench")

LLAMA_CPP_PYTHON_VERSION = "0.3.36"


def llama_server_cache() -> pathlib.Path:
    return cache_dir() / "llama-server"


def find_llama_server() -> pathlib.Path | None:
    """``$LLAMA_SERVER``, else a binary built earlier by ``build_llama_server``, else None."""
    env = os.environ.get("LLAMA_SERVER")
    if env:
        path = pathlib.Path(env).expanduser()
        if not path.is_file():
            raise SystemExit(f"LLAMA_SERVER={env}: no such file")
        return path
    cached = llama_server_cache() / "bin" / "llama-server"
    return cached if cached.is_file() else None


def build_llama_server(jobs: int = 2) -> pathlib.Path:
    """Build llama-server once from the llama.cpp sources in the llama-cpp-python sdist (the same llama.cpp
    the engine runs) into the cache folder; returns the binary. Takes ~15-30 min on 2 busy cores."""
    cache = llama_server_cache()
    binary = cache / "bin" / "llama-server"
    if binary.is_file():
        return binary
    src_root = cache / "src"
    src_root.mkdir(parents=True, exist_ok=True)
    sdist = src_root / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not sdist.is_file():
        log.info("downloading the llama-cpp-python %s sdist", LLAMA_CPP_PYTHON_VERSION)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
             "-d", str(src_root), f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"],
            check=True,
        )  # fmt: skip
    llama_src = src_root / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
    if not (llama_src / "CMakeLists.txt").is_file():
        with tarfile.open(sdist) as tf:
            tf.extractall(src_root, filter="data")
    build = cache / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    # NOTE: no OpenSSL/curl (no network anyway) and no web UI (its prebuilt copy would be downloaded).
    subprocess.run(
        ["cmake", "-S", str(llama_src), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
         "-DLLAMA_BUILD_SERVER=ON", "-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF",
         "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"],
        check=True,
    )  # fmt: skip
    log.info("building llama-server with %d jobs (this takes a while)", jobs)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", f"-j{jobs}"], check=True)
    built = build / "bin" / "llama-server"
    binary.parent.mkdir(parents=True, exist_ok=True)
    # The binary finds its shared libraries next to itself (rpath $ORIGIN): copy them along.
    for lib in (build / "bin").glob("*.so*"):
        shutil.copy2(lib, binary.parent / lib.name, follow_symlinks=False)
    shutil.copy2(built, binary)
    return binary


class LlamaServer:
    """``llama-server`` on the whole GGUF with ``slots`` parallel slots (continuous batching is its default)."""

    def __init__(self, children: Children, binary: pathlib.Path, gguf: pathlib.Path, threads: int, slots: int,
                 ctx_per_slot: int = 1024, omp: str = "default") -> None:  # fmt: skip
        self.children = children
        self.binary = binary
        self.gguf = gguf
        self.threads = threads
        self.slots = slots
        self.ctx_per_slot = ctx_per_slot
        self.omp = omp
        self.proc: ChildProcess | None = None
        self.last_proc: ChildProcess | None = None
        self.url = ""

    def start(self) -> LlamaServer:
        port = free_port()
        cmd = [
            str(self.binary), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(self.threads), "-tb", str(self.threads), "-np", str(self.slots),
            "-c", str(self.ctx_per_slot * self.slots), "--cont-batching", "--no-webui",
        ]  # fmt: skip
        env = omp_env(self.omp)
        self.proc = self.last_proc = self.children.start("llama-server", cmd, env)
        self.url = f"http://127.0.0.1:{port}"
        wait_http(f"{self.url}/health", self.proc)
        return self

    def log_tail(self, n: int = 30) -> str:
        """The end of the log of the server started last (also after ``stop``)."""
        return tail(self.last_proc, n) if self.last_proc else ""

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def stop(self) -> None:
        if self.proc:
            self.children.stop([self.proc])
            self.proc = None
