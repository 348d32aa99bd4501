"""The one thread a runtime's llama.cpp calls run on (llama.cpp contexts are not thread-safe; STYLE.md rule 3).

``concurrent.futures.ThreadPoolExecutor`` with ``loop.run_in_executor`` would do, but every call then builds a
concurrent future (with its own condition variable), a work item and a chain of callbacks copying one future's
state into another: on a served stage that is a tenth of the event loop's Python work per token, run with caches
that the decode has just flushed (scripts/README.md, "Session 11"). Here a call is one entry on a ``SimpleQueue``
and one ``call_soon_threadsafe`` back.

A caller may also run a call on its own thread while the worker is idle (``run_here_if_idle``): calls still run one
at a time and in the order they were made, on whichever thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_STOP = object()


class WorkerThread:
    """A single worker thread running submitted calls in order."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()  # orders submit against shutdown; guards _queued
        self._running = threading.Lock()  # held while a call runs, on the worker or on a caller's thread
        self._queued = 0  # calls put and not yet finished
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            with self._running:
                hand_over = item()
            with self._lock:
                self._queued -= 1
            hand_over()  # NOTE: once idle again: the caller's next call may then run on its own thread

    def _put(self, item: Callable[[], Callable[[], None]]) -> None:
        """Queue ``item``: it runs the call and returns what hands its outcome over."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"worker thread {self._thread.name} is shut down")
            self._queued += 1
            self._queue.put(item)

    def run_here_if_idle(self, fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """Run ``fn(*args)`` on the calling thread if nothing is queued or running on the worker: ``(True, result)``;
        otherwise ``(False, None)`` without running it. Saves the two thread switches of a call, which on a process
        pinned to one core are a context switch each way (scripts/README.md, "Session 15")."""
        with self._lock:
            if self._queued or self._closed or not self._running.acquire(blocking=False):
                return False, None
        try:
            return True, fn(*args)
        finally:
            self._running.release()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the thread and await its result (or exception). A caller that stops waiting does
        not stop the call: llama.cpp calls are not interruptible, and the next call waits for this one anyway."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def item() -> Callable[[], None]:
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting side
                return lambda err=exc: _reply(loop, fut, None, err)  # NOTE: the except clause unbinds exc
            return lambda: _reply(loop, fut, result, None)

        self._put(item)
        return await fut

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run ``fn(*args)`` on the thread; the returned future holds its outcome (for synchronous callers)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def item() -> Callable[[], None]:
            if not fut.set_running_or_notify_cancel():
                return lambda: None
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting side
                return lambda err=exc: fut.set_exception(err)
            return lambda: fut.set_result(result)

        self._put(item)
        return fut

    def shutdown(self, wait: bool = True) -> None:
        """Run what is queued, then stop the thread (joined when ``wait``)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> WorkerThread:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _reply(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    try:
        loop.call_soon_threadsafe(_settle, fut, result, exc)
    except RuntimeError:
        log.debug("worker thread: the event loop closed before a call's result came back")


def _settle(fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if fut.done():  # the awaiting task was cancelled
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
