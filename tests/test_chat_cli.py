"""``chatloop chat`` through a pseudo-terminal against a real 2-stage cluster: a streamed answer equal to the API's,
Ctrl-C mid-reply (the request is cancelled in every stage and the program goes on), /reset, /system, Ctrl-D."""

from __future__ import annotations

import os
import re
import signal
import sys

import pytest

from chatloop.demo import demo_model_dir
from tests.cluster_harness import ROOT, Cluster, http_json, wait_until

pexpect = pytest.importorskip("pexpect", reason="pexpect is not installed (pip install -e '.[dev]')")

QUESTION = "What is the capital of France?"
STATS = re.compile(r"\[(\d+) tokens[^\]]*\]")


@pytest.fixture(scope="module")
def cluster(module_procs, tmp_path_factory):
    return Cluster(module_procs, demo_model_dir(2), tmp_path_factory.mktemp("chat-cli")).start()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _chat(url: str, *args: str, logfile=None, preexec_fn=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "chatloop.cli", "chat", url, *args],
        cwd=str(ROOT),
        env=env,
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 200),
        preexec_fn=preexec_fn,
    )
    child.logfile_read = logfile
    return child


def _answer(child, question: str) -> str:
    """Ask ``question``; the text streamed between ``bot> `` and the stats line."""
    child.sendline(question)
    child.expect_exact("bot> ")
    child.expect(STATS)
    text = child.before.replace("\r\n", "\n")
    child.expect_exact("you> ")
    return text.rstrip("\n")


def _api(url: str, messages: list[dict], max_tokens: int) -> str:
    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens}
    status, out = http_json(f"{url}/v1/chat/completions", body, timeout=120)
    assert status == 200, out
    return out["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_chat_in_a_terminal(cluster, tmp_path):
    log = open(tmp_path / "chat.log", "w")  # noqa: SIM115 - the transcript, kept for a failed run
    child = _chat(cluster.url, "--temperature", "0", "--max-tokens", "32", logfile=log)
    try:
        child.expect("Chatting with SmolLM2")
        child.expect_exact("you> ")
        first = _answer(child, QUESTION)
        assert first == _api(cluster.url, [{"role": "user", "content": QUESTION}], 32)
        # The next question carries the history...
        second = _answer(child, "Why?")
        history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first}]
        assert second == _api(cluster.url, [*history, {"role": "user", "content": "Why?"}], 32)
        # ... and /reset drops it: the same question gets the fresh-conversation answer again.
        child.sendline("/reset")
        child.expect_exact("(new conversation)")
        child.expect_exact("you> ")
        assert _answer(child, QUESTION) == first
        child.sendline("/system You are a pirate. Answer like a pirate.")
        child.expect_exact("system prompt set")
        child.expect_exact("you> ")
        pirate = _answer(child, QUESTION)
        system = {"role": "system", "content": "You are a pirate. Answer like a pirate."}
        assert pirate == _api(cluster.url, [system, {"role": "user", "content": QUESTION}], 32)
        child.sendline("/nonsense")
        child.expect_exact("unknown command /nonsense")
        child.expect_exact("you> ")
        child.sendeof()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        if child.isalive():
            child.terminate(force=True)
        log.close()


@pytest.mark.slow
def test_ctrl_c_stops_the_reply_and_the_request(cluster, tmp_path):
    log = open(tmp_path / "chat.log", "w")  # noqa: SIM115
    # Started with SIGINT ignored, as a shell script's background job is: Ctrl-C must still stop the reply.
    child = _chat(cluster.url, "--temperature", "0", "--max-tokens", "500", logfile=log, preexec_fn=_ignore_sigint)
    try:
        child.expect_exact("you> ")
        child.sendline("Count from 1 to 500, separated by commas.")
        child.expect_exact("bot> ")
        child.expect(r"\d+\D+\d+\D+\d+")  # it is streaming (a numbered list or a comma-separated one)
        assert sum(cluster.live_sequences()) >= 1
        child.sendintr()
        child.expect(r"\[(\d+) tokens[^\]]*stopped\]")
        child.expect_exact("you> ")
        wait_until(lambda: cluster.live_sequences() == [0, 0], timeout=30, what="the sequence freed in every stage")
        # Still chatting after the interrupt; Ctrl-C at the prompt does not leave either.
        child.sendintr()
        child.expect_exact("Ctrl-D or /quit leaves")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        if child.isalive():
            child.terminate(force=True)
        log.close()


def test_unreachable_server_is_a_clear_error(tmp_path):
    from chatloop.http_util import free_port  # noqa: PLC0415

    child = _chat(f"http://127.0.0.1:{free_port()}")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    assert "cannot reach http://127.0.0.1:" in child.before
