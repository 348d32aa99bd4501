"""The decode worker thread (chatloop/engine/worker_thread.py) and the servers' event loop (chatloop/event_loop.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from chatloop import event_loop
from chatloop.engine.worker_thread import WorkerThread


def test_calls_run_in_order_on_one_thread_and_results_come_back():
    seen: list[tuple[int, str]] = []

    def work(i: int) -> int:
        seen.append((i, threading.current_thread().name))
        return i * i

    async def main() -> list[int]:
        return list(await asyncio.gather(*(worker.call(work, i) for i in range(50))))

    with WorkerThread("decode-test") as worker:
        assert asyncio.run(main()) == [i * i for i in range(50)]
        assert worker.submit(work, 7).result(timeout=5) == 49
    assert [i for i, _ in seen] == [*range(50), 7]
    assert {name for _, name in seen} == {"decode-test"}


def test_an_exception_reaches_the_caller_and_the_thread_keeps_working():
    def boom() -> None:
        raise ValueError("bad step")

    async def main() -> int:
        with pytest.raises(ValueError, match="bad step"):
            await worker.call(boom)
        return await worker.call(lambda: 5)

    with WorkerThread("decode-test") as worker:
        assert asyncio.run(main()) == 5
        with pytest.raises(ValueError, match="bad step"):
            worker.submit(boom).result(timeout=5)


def test_a_caller_that_stops_waiting_leaves_the_call_to_finish():
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow() -> int:
        started.set()
        release.wait(5)
        finished.set()
        return 1

    async def main() -> None:
        task = asyncio.create_task(worker.call(slow))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        # The next call runs after the abandoned one; its late result is dropped without an error.
        assert await worker.call(lambda: 2) == 2

    with WorkerThread("decode-test") as worker:
        asyncio.run(main())
    assert finished.is_set()


def test_a_shut_down_worker_refuses_new_calls_after_running_queued_ones():
    worker = WorkerThread("decode-test")
    done = worker.submit(lambda: "queued")
    worker.shutdown()
    assert done.result(timeout=5) == "queued"
    with pytest.raises(RuntimeError, match="shut down"):
        worker.submit(lambda: None)
    worker.shutdown()  # twice is harmless


def test_a_call_runs_on_the_callers_thread_only_when_the_worker_is_idle():
    """run_here_if_idle: never beside a running call, never ahead of a queued one (calls stay one at a time and in
    order); an exception reaches the caller; the worker's result is handed over once it is idle again, so that the
    caller's next call can run on its own thread."""
    started, release = threading.Event(), threading.Event()
    seen: list[str] = []

    def note(tag: str) -> str:
        seen.append(f"{tag}@{threading.current_thread().name}")
        return tag

    def slow() -> None:
        started.set()
        release.wait(5)
        note("slow")

    with WorkerThread("decode-test") as worker:
        here = threading.current_thread().name
        assert worker.run_here_if_idle(note, "first") == (True, "first")
        running = worker.submit(slow)
        assert started.wait(5)
        assert worker.run_here_if_idle(note, "beside") == (False, None)  # a call runs on the worker
        queued = worker.submit(note, "queued")
        release.set()
        running.result(timeout=5)
        queued.result(timeout=5)
        assert worker.run_here_if_idle(note, "after") == (True, "after")
        with pytest.raises(ValueError, match="bad step"):
            worker.run_here_if_idle(_raise, ValueError("bad step"))

        async def main() -> tuple[bool, object]:
            await worker.call(note, "awaited")
            return worker.run_here_if_idle(note, "next")  # the worker was idle before the result came back

        assert asyncio.run(main()) == (True, "next")
    assert seen == [
        f"first@{here}",
        "slow@decode-test",
        "queued@decode-test",
        f"after@{here}",
        "awaited@decode-test",
        f"next@{here}",
    ]
    assert worker.run_here_if_idle(note, "closed") == (False, None)


def _raise(exc: BaseException) -> None:
    raise exc


def test_the_event_loop_choice(monkeypatch):
    monkeypatch.setenv(event_loop.ENV, "asyncio")
    assert event_loop.chosen_loop() == "asyncio"
    assert event_loop.run(asyncio.sleep(0, result="ran")) == "ran"
    monkeypatch.setenv(event_loop.ENV, "tokio")
    with pytest.raises(event_loop.EventLoopError, match="CHATLOOP_EVENT_LOOP='tokio': expected one of uvloop, asyncio"):
        event_loop.chosen_loop()
    monkeypatch.delenv(event_loop.ENV)
    pytest.importorskip("uvloop")
    assert event_loop.chosen_loop() == "uvloop"
    assert event_loop.run(_loop_name()) == "Loop"


async def _loop_name() -> str:
    return type(asyncio.get_running_loop()).__name__


def test_step_trace_marks_reach_a_file_per_process_only_when_asked(tmp_path):
    """chatloop/step_trace.py: off by default; with CHATLOOP_STEP_TRACE each process writes its marks, in order,
    with monotonic nanoseconds, when it exits."""
    import os
    import subprocess
    import sys

    code = (
        "import os; from chatloop import step_trace as t\n"
        "assert t.ENABLED == bool(os.environ.get(t.ENV))\n"
        "t.mark('frame_in'); t.mark('decode'); t.mark('decode_end'); print(os.getpid())"
    )
    env = {k: v for k, v in os.environ.items() if k != "CHATLOOP_STEP_TRACE"}
    quiet = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert quiet.stdout.strip() and not list(tmp_path.iterdir())
    env["CHATLOOP_STEP_TRACE"] = str(tmp_path / "marks")
    traced = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    lines = (tmp_path / f"marks.{traced.stdout.strip()}").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["frame_in", "decode", "decode_end"]
    times = [int(line.split()[1]) for line in lines]
    assert times == sorted(times)


def test_step_trace_into_a_folder_that_does_not_exist_turns_itself_off(tmp_path):
    """A bad CHATLOOP_STEP_TRACE must not fail the mark that happens to flush (it runs inside a step)."""
    import os
    import subprocess
    import sys

    code = (
        "from chatloop import step_trace as t\n"
        "for _ in range(t.FLUSH_EVERY + 1): t.mark('decode')\n"
        "assert not t.ENABLED; print('served on')"
    )
    env = {**os.environ, "CHATLOOP_STEP_TRACE": str(tmp_path / "missing" / "marks")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "served on"
    assert "cannot write step marks" in out.stderr and "Traceback" not in out.stderr
