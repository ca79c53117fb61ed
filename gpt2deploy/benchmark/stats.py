"""Robust summaries of repeated measurements: median and spread (min, max, interquartile range)."""

from __future__ import annotations

import statistics


def summarize(values: list[float]) -> dict:
    """``{"median", "min", "max", "q1", "q3", "n"}`` of ``values`` (q1/q3 by linear interpolation)."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("summarize() needs at least one value")
    return {
        "median": statistics.median(xs),
        "min": xs[0],
        "max": xs[-1],
        "q1": _quantile(xs, 0.25),
        "q3": _quantile(xs, 0.75),
        "n": len(xs),
    }


def _quantile(xs: list[float], q: float) -> float:
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
