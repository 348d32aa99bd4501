"""Progress bars for long one-shot jobs (conversion, model download), on stderr and only for a person watching.

When stderr is not a terminal (CI, a log collector, ``chatloop serve`` under a supervisor) bars would only fill logs
with carriage returns, so they are off and the jobs' periodic log lines remain the record of progress.
``CHATLOOP_PROGRESS=0`` turns them off on a terminal too.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def enabled() -> bool:
    if os.environ.get("CHATLOOP_PROGRESS", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(total: int | float | None, desc: str, unit: str = "it", unit_scale: bool = False):
    """A tqdm bar on stderr, or an object with the same ``update``/``close`` that draws nothing."""
    if not enabled():
        return _NoBar()
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415 - installed with huggingface_hub
    except ImportError:
        log.debug("tqdm is not installed: no progress bars")
        return _NoBar()
    return tqdm(
        total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=sys.stderr, leave=False, dynamic_ncols=True
    )


def configure_hub() -> None:
    """huggingface_hub draws its own download bars; keep them for a terminal only."""
    if enabled():
        return
    try:
        from huggingface_hub.utils import disable_progress_bars  # noqa: PLC0415
    except ImportError:
        return
    disable_progress_bars()
