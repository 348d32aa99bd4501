"""Command-line pieces the benchmarks share: comma-separated configuration lists, checked."""

from __future__ import annotations

import argparse
from collections.abc import Iterable


def comma_list(
    p: argparse.ArgumentParser, flag: str, text: str, allowed: Iterable[str], default: str = ""
) -> list[str]:
    """``text`` ("a,b") as a list of values, each one of ``allowed``; an empty text is ``[default]`` when given.
    Anything else ends the program with an argparse error naming ``flag``, the values allowed and what came."""
    allowed = list(allowed)
    values = [x.strip() for x in text.split(",") if x.strip()] or ([default] if default else [])
    if not values or any(v not in allowed for v in values):
        p.error(f"{flag}: expected some of {','.join(allowed)} (comma-separated), got {text!r}")
    return values
