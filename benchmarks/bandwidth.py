"""A small read-bandwidth probe, run between engines in the same harness run.

``read_gbps(threads)``: the best of a few passes of ``numpy.sum`` over a 256 MiB float32 array (far larger than
the caches), split over ``threads`` threads (numpy releases the GIL inside the reduction). Decode at batch 1
reads every weight once per token, so weight bytes per token x tokens/s over this is the fraction of the
machine's read bandwidth an engine uses.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_ARRAY: np.ndarray | None = None


def _array() -> np.ndarray:
    global _ARRAY
    if _ARRAY is None:
        _ARRAY = np.ones(64 * 2**20, dtype=np.float32)  # 256 MiB, touched once here
    return _ARRAY


def read_gbps(threads: int = 1, passes: int = 3) -> float:
    a = _array()
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(passes):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def release() -> None:
    global _ARRAY
    _ARRAY = None
