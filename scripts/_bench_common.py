"""Shared pieces of the serving benchmarks (bench_serve.py, bench_load.py).

- ``ChatLoopCluster``: stage processes plus a coordinator of a converted model on loopback, with the knobs
  the benchmarks compare (threads per stage, pipeline depth, batching window, OpenMP wait policy).
- ``LlamaServer``: llama.cpp's own ``llama-server`` on loopback (``find_llama_server`` / ``build_llama_server``).
- ``stream_completion``: one streamed ``POST /v1/completions`` from an aiohttp client, timed per chunk.
- ``InProcess``: the whole model in this process (``StageRuntime`` on the whole GGUF), timed per token.

Every child process is started in its own session and stopped by its own pid (process group) at exit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from chatloop.demo import cache_dir  # noqa: E402
from chatloop.http_util import free_port, wait_http_ok  # noqa: E402
from chatloop.modelfiles.manifest import load_manifest  # noqa: E402

log = logging.getLogger("bench")

LLAMA_CPP_PYTHON_VERSION = "0.3.36"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100, linear interpolation); NaN for no values."""
    return float(np.percentile(values, q)) if values else float("nan")


# -- child processes -----------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the benchmark dies, even by SIGKILL (Linux prctl)."""
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that ``finally`` blocks stop the children."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


class Children:
    """Processes this benchmark started; ``stop`` ends each one's own process group by pid."""

    def __init__(self, logdir: pathlib.Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        """Start ``cmd``; ``env`` adds variables, and a value of None removes one inherited from this process."""
        log_file = open(self.logdir / f"{name}-{len(self.procs)}.log", "wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in full_env.items() if v is not None},
            preexec_fn=_die_with_parent,
            cwd=ROOT,
            start_new_session=True,
        )
        log_file.close()
        proc.log_path = log_file.name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stop(self, procs: list[subprocess.Popen] | None = None) -> None:
        targets = list(self.procs if procs is None else procs)
        for p in targets:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in targets:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
            if p in self.procs:
                self.procs.remove(p)


def tail(proc: subprocess.Popen, n: int = 20) -> str:
    try:
        lines = pathlib.Path(proc.log_path).read_text(errors="replace").splitlines()  # type: ignore[attr-defined]
        return "\n".join(lines[-n:])
    except OSError:
        return ""


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    """Wait until GET ``url`` answers 200 (or fail when ``proc`` exits), showing the end of its log on failure."""
    wait_http_ok(url, proc, timeout, detail=lambda: tail(proc))


# -- ChatLoop ------------------------------------------------------------------------------------------


def omp_env(omp: str) -> dict[str, str | None]:
    """Environment for llama.cpp's OpenMP threads (libgomp): ``default`` (both unset: idle threads spin about
    300k rounds, a few ms, before sleeping), ``passive`` (OMP_WAIT_POLICY=PASSIVE: sleep at once, which also
    makes every ggml barrier inside a decode a futex sleep/wake) or ``spin<N>`` (GOMP_SPINCOUNT=N)."""
    if omp == "default":
        return {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}
    if omp == "passive":
        return {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None}
    if omp.startswith("spin") and omp[4:].isdigit():
        return {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": omp[4:]}
    raise ValueError(f"OpenMP setting must be default, passive or spin<N> (e.g. spin20000), got {omp!r}")


@dataclass(frozen=True)
class ChatLoopVariant:
    threads: int = 2  # llama.cpp threads per stage process
    pipeline_depth: int = 1  # coordinator batching.pipeline_depth (0 = one micro-batch per stage)
    window_ms: float = 0.0  # stage batching.batching_window_ms
    omp: str = "spin20000"  # stage processes' OpenMP wait behaviour (see omp_env)
    pin: bool = False  # pin stage K to core K modulo the cores (performance.cpu_cores)

    @property
    def label(self) -> str:
        depth = self.pipeline_depth or "auto"
        return f"t{self.threads} d{depth} w{self.window_ms:g} omp-{self.omp}" + (" pinned" if self.pin else "")


class ChatLoopCluster:
    """Every stage of ``model_dir`` as its own process plus a coordinator, on free loopback ports."""

    def __init__(self, children: Children, model_dir: pathlib.Path, variant: ChatLoopVariant, workdir: pathlib.Path):
        self.children = children
        self.model_dir = pathlib.Path(model_dir)
        self.variant = variant
        self.workdir = workdir
        self.manifest = load_manifest(self.model_dir)
        self.procs: list[subprocess.Popen] = []
        self.stage_urls: list[str] = []
        self.url = ""

    def start(self) -> ChatLoopCluster:
        v = self.variant
        env = omp_env(v.omp)
        stage_procs = []
        for s in self.manifest.stages:
            port = free_port()
            cfg = {
                "weights_path": str(self.model_dir / s.file),
                "layer_group": s.index,
                "host": "127.0.0.1",
                "port": port,
                "verify_sha256": False,  # start fast; the files are the cached demo conversion
                "batching": {"batching_window_ms": v.window_ms},
                "performance": {"n_threads": v.threads, "kv_cache_mb": 256}
                | ({"enable_cpu_pinning": True, "cpu_cores": str(s.index % os.cpu_count())} if v.pin else {}),
                "observability": {"log_level": "WARNING"},
            }
            path = self.workdir / f"stage-{s.index}-{port}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            cmd = [sys.executable, "-m", "chatloop.cli", "stage", "--config", str(path)]
            stage_procs.append(self.children.start(f"stage-{s.index}", cmd, env))
            self.stage_urls.append(f"http://127.0.0.1:{port}")
        self.procs.extend(stage_procs)
        for url, proc in zip(self.stage_urls, stage_procs):
            wait_http(f"{url}/readyz", proc)
        port = free_port()
        cfg = {
            "stages": [[u] for u in self.stage_urls],
            "model_dir": str(self.model_dir),
            "host": "127.0.0.1",
            "port": port,
            "batching": {"pipeline_depth": v.pipeline_depth, "max_batch_size": 16},
            "observability": {"log_level": "WARNING"},
        }
        path = self.workdir / f"coordinator-{port}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, "-m", "chatloop.cli", "coordinator", "--config", str(path)]
        proc = self.children.start("coordinator", cmd)
        self.procs.append(proc)
        self.url = f"http://127.0.0.1:{port}"
        wait_http(f"{self.url}/readyz", proc)
        return self

    @property
    def pids(self) -> dict[str, int]:
        names = [f"stage-{i}" for i in range(len(self.stage_urls))] + ["coordinator"]
        return {n: p.pid for n, p in zip(names, self.procs)}

    def stop(self) -> None:
        self.children.stop(self.procs)
        self.procs.clear()


# -- llama-server --------------------------------------------------------------------------------------


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
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> LlamaServer:
        port = free_port()
        cmd = [
            str(self.binary), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(self.threads), "-tb", str(self.threads), "-np", str(self.slots),
            "-c", str(self.ctx_per_slot * self.slots), "--cont-batching", "--no-webui", "--log-disable",
        ]  # fmt: skip
        env = omp_env(self.omp)
        self.proc = self.children.start("llama-server", cmd, env)
        self.url = f"http://127.0.0.1:{port}"
        wait_http(f"{self.url}/health", self.proc)
        return self

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def stop(self) -> None:
        if self.proc:
            self.children.stop([self.proc])
            self.proc = None


# -- the streaming client ------------------------------------------------------------------------------


@dataclass
class StreamResult:
    sent: float  # perf_counter when the request went out
    chunk_times: list[float] = field(default_factory=list)  # arrival of every chunk that carried text
    text: str = ""
    tokens: int = 0  # generated tokens (usage.completion_tokens, else text chunks)
    prompt_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent if self.chunk_times else float("nan")

    @property
    def done(self) -> float:
        return self.chunk_times[-1] if self.chunk_times else self.sent

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


async def stream_completion(session, url: str, prompt: list[int] | str, max_tokens: int) -> StreamResult:
    """One streamed greedy ``/v1/completions`` request; the time of each text-carrying SSE chunk is kept."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    res = StreamResult(sent=time.perf_counter())
    usage_tokens = None
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for raw in resp.content:
                now = time.perf_counter()
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"])[:200]
                    break
                for choice in obj.get("choices") or []:
                    text = choice.get("text") or ""
                    if text:
                        res.chunk_times.append(now)
                        res.text += text
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]
                if obj.get("usage"):
                    usage_tokens = obj["usage"].get("completion_tokens")
                    res.prompt_tokens = obj["usage"].get("prompt_tokens") or 0
    except Exception as exc:  # noqa: BLE001 - reported in the result
        res.error = f"{type(exc).__name__}: {exc}"
    res.tokens = usage_tokens if usage_tokens is not None else len(res.chunk_times)
    return res


@dataclass
class LoadResult:
    results: list[StreamResult]
    wall: float  # seconds from the first request sent to the last chunk received
    cpu: float = float("nan")  # CPU seconds the serving processes used meanwhile (user + system)

    def summary(self) -> dict:
        ok = [r for r in self.results if not r.error]
        tokens = sum(r.tokens for r in ok)
        ttfts = [r.ttft for r in ok if r.chunk_times]
        gaps = [g for r in ok for g in r.gaps()]
        return {
            "requests": len(self.results),
            "errors": len(self.results) - len(ok),
            "tokens": tokens,
            "tok_s": tokens / self.wall if self.wall > 0 else float("nan"),
            "ttft_p50_ms": 1000 * percentile(ttfts, 50),
            "ttft_p95_ms": 1000 * percentile(ttfts, 95),
            "itl_p50_ms": 1000 * percentile(gaps, 50),
            "itl_p95_ms": 1000 * percentile(gaps, 95),
            "wall_s": self.wall,
            # CPU cost per token: steadier than tokens/s on a shared machine (spinning threads count as cost).
            "cpu_ms_per_tok": 1000 * self.cpu / tokens if tokens else float("nan"),
        }


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (all their threads) so far."""
    import psutil  # noqa: PLC0415

    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


class UniquePrompts:
    """Fixed texts taken round-robin, each request made unique by a leading serial number.

    NOTE: llama-server's slots keep the KV cache of their last prompt and reuse the common prefix of the next
    one (``cache_prompt``, on by default): repeating the same prompts would let it skip prefill entirely while
    ChatLoop and the in-process baseline compute every prompt. A distinct first token defeats that reuse."""

    def __init__(self, texts: list[str], tokenize) -> None:
        self.texts = texts
        self.tokenize = tokenize
        self.count = 0

    def __call__(self) -> list[int]:
        text = self.texts[self.count % len(self.texts)]
        self.count += 1
        return self.tokenize(f"{self.count}. {text}")


async def run_load(
    url: str, prompts, n_requests: int, concurrency: int, max_tokens: int, pids: list[int] = ()
) -> LoadResult:
    """Closed loop: ``concurrency`` clients, each sending its next request when the previous one ends, until
    ``n_requests`` have been served; ``prompts()`` gives each request's token ids."""
    import aiohttp  # noqa: PLC0415

    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for _ in range(n_requests):
        queue.put_nowait(prompts())
    results: list[StreamResult] = []
    # NOTE: one connection per request: llama-server closes a connection after a streamed reply, and a
    # reused one then fails ("Can not write request body"). Both servers get the same treatment.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            while True:
                try:
                    prompt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await stream_completion(session, url, prompt, max_tokens))

        cpu0 = cpu_seconds(pids) if pids else 0.0
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        end = max([r.done for r in results] + [start])
        cpu = cpu_seconds(pids) - cpu0 if pids else float("nan")
    errors = [r.error for r in results if r.error]
    if errors:
        log.warning("%d of %d requests failed, first: %s", len(errors), len(results), errors[0])
    return LoadResult(results, end - start, cpu)


# -- the whole model in this process -------------------------------------------------------------------


class InProcess:
    """The whole GGUF in one ``StageRuntime`` (llama-cpp-python's low-level API), greedy, one request at a time."""

    def __init__(self, gguf: pathlib.Path, threads: int) -> None:
        from chatloop.engine.runtime import RuntimeOptions, StageRole, StageRuntime  # noqa: PLC0415
        from chatloop.engine.tokenizer import Tokenizer  # noqa: PLC0415

        # The same context settings as a served stage (config defaults, kv_cache_mb as ChatLoopCluster sets it).
        self.rt = StageRuntime(
            gguf, StageRole(first=True, last=True), RuntimeOptions(n_threads=threads, kv_cache_mb=256)
        )
        self.tok = Tokenizer(gguf)
        self._seq = 0

    def generate(self, prompt: list[int], max_tokens: int) -> StreamResult:
        """Prefill then greedy decode; one "chunk" time per generated token, stopping at end-of-generation."""
        from chatloop.protocol.messages import SeqStep  # noqa: PLC0415
        from chatloop.protocol.sampling import SamplingParams  # noqa: PLC0415

        self._seq += 1
        seq = self._seq
        rt = self.rt
        res = StreamResult(sent=time.perf_counter())
        params = SamplingParams(temperature=0.0)
        out = rt.run(rt.forward, [SeqStep(seq, 0, len(prompt), sample=True, sampling=params)],
                     np.asarray(prompt, np.int32))  # fmt: skip
        pos = len(prompt)
        generated = []
        while True:
            token = out[0].token
            if self.tok.is_eog(token):
                res.finish_reason = "stop"
                break
            generated.append(token)
            res.chunk_times.append(time.perf_counter())
            if len(generated) >= max_tokens:
                res.finish_reason = "length"
                break
            out = rt.run(rt.forward, [SeqStep(seq, pos, 1, sample=True)], np.asarray([token], np.int32))
            pos += 1
        rt.run(rt.release, seq)
        res.tokens = len(generated)
        res.prompt_tokens = len(prompt)
        res.text = self.tok.detokenize(generated)
        return res

    def close(self) -> None:
        self.rt.close()
        self.tok.close()


def sequential_load(engine: InProcess, prompts, n_requests: int, concurrency: int,
                    max_tokens: int) -> LoadResult:  # fmt: skip
    """The same closed-loop workload served one request after another by ``engine``.

    Requests run back to back; each one's arrival is when its client's previous request ended (the first
    ``concurrency`` arrive at the start), so TTFT includes the wait a one-at-a-time server imposes."""
    start = time.perf_counter()
    cpu0 = time.process_time()  # this process: the model's threads (the client is idle meanwhile)
    results = []
    for i in range(n_requests):
        r = engine.generate(prompts(), max_tokens)
        r.sent = start if i < concurrency else results[i - concurrency].done
        results.append(r)
    return LoadResult(results, max(r.done for r in results) - start, time.process_time() - cpu0)


def variant_from_args(args) -> ChatLoopVariant:
    return ChatLoopVariant(
        threads=args.stage_threads, pipeline_depth=args.pipeline_depth, window_ms=args.window_ms, omp=args.omp
    )


def add_variant_args(p, best: ChatLoopVariant) -> None:
    """Flags selecting the ChatLoop configuration (defaults: the fastest found on this 2-core machine)."""
    p.add_argument("--stage-threads", type=int, default=best.threads,
                   help=f"llama.cpp threads per stage (default {best.threads})")  # fmt: skip
    p.add_argument("--pipeline-depth", type=int, default=best.pipeline_depth,
                   help=f"coordinator batching.pipeline_depth, 0 = one per stage (default {best.pipeline_depth})")  # fmt: skip
    p.add_argument("--window-ms", type=float, default=best.window_ms,
                   help=f"stage batching.batching_window_ms (default {best.window_ms:g})")  # fmt: skip
    p.add_argument("--omp", default=best.omp,
                   help=f"stage processes' OpenMP waiting: default, passive or spin<N> (default {best.omp})")  # fmt: skip


def workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="chatloop-bench-")


def asdict(obj) -> dict:
    return dataclasses.asdict(obj)


def stage_counters(url: str) -> dict[str, float]:
    """Sums and counts of a stage's forward, queue-time and batch-size histograms (from ``/metrics``)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    wanted = {
        "worker_forward_duration_seconds_sum": "forward_s",
        "worker_forward_duration_seconds_count": "forwards",
        "worker_queue_time_seconds_sum": "queue_s",
        "worker_queue_time_seconds_count": "queued",
        "worker_batch_size_sum": "batch_rows",
        "worker_batch_size_count": "batches",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            out[wanted[name]] += float(line.rsplit(" ", 1)[1])
    return out


def counters_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}
