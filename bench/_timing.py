"""Timing helper shared by the benchmark scripts (run as ``python bench/bench_*.py``)."""

from __future__ import annotations

import time


def best_of(fn, repeat: int) -> tuple[float, object]:
    """Best wall time (s) of ``repeat`` calls of ``fn`` and the last call's result."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out
