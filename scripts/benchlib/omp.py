"""The OpenMP environment of llama.cpp processes (libgomp's wait policy), as the benchmarks compare it."""

from __future__ import annotations


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
