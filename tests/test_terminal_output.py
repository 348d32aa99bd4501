"""``chatloop serve`` on a terminal: readable log lines (time, level, message) from every process and a clear final
"serving at" line; no JSON lines unless asked for."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from chatloop.demo import demo_model_dir
from chatloop.http_util import free_port
from chatloop.modelfiles.manifest import load_manifest
from tests.cluster_harness import ROOT, http_json

pexpect = pytest.importorskip("pexpect", reason="pexpect is not installed (pip install -e '.[dev]')")


@pytest.mark.slow
def test_serve_on_a_terminal_logs_readable_lines(tmp_path):
    model = demo_model_dir(2)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("CHATLOOP_LOG_FORMAT", None)
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - the transcript, kept for a failed run
    child = pexpect.spawn(
        sys.executable,
        ["-m", "chatloop.cli", "serve", str(model), "--port", str(port), "--threads", "1"],
        cwd=str(ROOT),
        env=env,
        encoding="utf-8",
        timeout=240,
        dimensions=(50, 250),
    )
    child.logfile_read = log
    try:
        child.expect(rf"ChatLoop is serving \S+ at http://127\.0\.0\.1:{port}  \(chat: http://127\.0\.0\.1:{port}/ ")
        before = child.before
        assert re.search(r"^\d\d:\d\d:\d\d\.\d{3} INFO    serve       stage-0-r0 ready at http://", before, re.M), (
            before
        )
        second = load_manifest(model).stages[1]  # its layer range is the converter's choice, not this test's
        layers = f"{second.layer_start}:{second.layer_end}"
        assert re.search(
            rf"^\d\d:\d\d:\d\d\.\d{{3}} INFO    stage-1-r0  stage 1 \(layers {layers}\) serving", before, re.M
        )
        assert re.search(r"^\d\d:\d\d:\d\d\.\d{3} INFO    coordinator coordinator listening on ", before, re.M), before
        assert '{"timestamp"' not in before and '"event": "ready"' not in before
        assert http_json(f"http://127.0.0.1:{port}/readyz")[0] == 200
        child.sendintr()
        child.expect(pexpect.EOF)
        child.close()
        assert '{"timestamp"' not in child.before
    finally:
        if child.isalive():
            # Ctrl-C first: serve stops the stages and the coordinator it started (they run in their own sessions).
            child.sendintr()
            try:
                child.expect(pexpect.EOF, timeout=30)
            except pexpect.TIMEOUT:
                child.terminate(force=True)
        log.close()


def test_conversion_draws_progress_bars_on_a_terminal_only(tmp_path):
    from tests.hf_fixtures import write_tiny_model  # noqa: PLC0415

    source = write_tiny_model(tmp_path / "hf", "llama")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CHATLOOP_PROGRESS", None)
    args = ["-m", "chatloop.cli", "convert", str(source), "--stages", "2", "--quant", "f16"]
    command = shlex.join([sys.executable, *args, "--out", str(tmp_path / "tty")])
    out, status = pexpect.run(command, cwd=str(ROOT), env=env, encoding="utf-8", timeout=120, withexitstatus=True)
    assert status == 0, out
    assert "converting to" in out and "writing stages" in out and "%|" in out, out
    # Not a terminal: the same run without bars (the log lines remain).
    done = subprocess.run(
        [sys.executable, *args, "--out", str(tmp_path / "pipe")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "%|" not in done.stderr and "\r" not in done.stderr and "wrote" in done.stderr
