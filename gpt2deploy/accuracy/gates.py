"""Accuracy gates: which metric, which direction, default thresholds per precision, baseline tolerances.

Defaults come from measurements on a trained GPT-2 (4 layers, 256 hidden) over the default text and windows;
the README's "Accuracy gates" table lists the measured values behind each threshold. fp32 and fp16 are held to
numerical noise; int8 and int4 to what a sound quantization achieves, with headroom, so that a broken one fails.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import UsageError


@dataclass(frozen=True)
class Gate:
    metric: str
    direction: str  # "max": value must be <= threshold; "min": value must be >= threshold
    description: str
    tolerance: float  # baseline guard: how much worse than the baseline report the metric may get
    use_abs: bool = False

    def value(self, metrics: Mapping) -> float | None:
        v = metrics.get(self.metric)
        if v is None:
            return None
        return abs(v) if self.use_abs else float(v)

    def passes(self, value: float | None, threshold: float) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return value <= threshold if self.direction == "max" else value >= threshold

    def worse_by(self, value: float | None, base: float | None) -> float | None:
        """How much worse ``value`` is than ``base`` (positive = worse), or None if either is missing."""
        if value is None or base is None:
            return None
        if not math.isfinite(value):
            return math.inf
        return value - base if self.direction == "max" else base - value


GATES: dict[str, Gate] = {
    g.metric: g
    for g in (
        Gate("ppl_delta", "max", "relative perplexity change |ppl / ppl_ref - 1|", 0.005, use_abs=True),
        Gate("top1", "min", "fraction of positions whose top-1 token equals the reference's", 0.005),
        Gate("top5", "min", "mean overlap of the top-5 token sets", 0.005),
        Gate("kl_mean", "max", "mean KL(reference || variant) per position, nats", 0.001),
        Gate("kl_p99", "max", "99th percentile of per-position KL, nats", 0.005),
        Gate("logit_max", "max", "largest absolute logit difference", 0.25),
        Gate("logit_p99", "max", "99th percentile of the per-position largest absolute logit difference", 0.1),
        Gate("nonfinite", "max", "NaN/Inf logits seen anywhere in the check", 0.0),
        Gate("greedy", "min", "mean fraction of greedy tokens matching the reference before the first divergence", 0.1),
        Gate("cache_diff", "max", "largest |decode-step logits - full-recompute logits|", 0.1),
        Gate("batch_diff", "max", "largest |left-padded batch logits - single-row logits| on real tokens", 0.1),
    )
}

#: Default thresholds per precision, set with headroom over what ``gpt2deploy check`` measures on the trained
#: reference GPT-2 (4 layers, 256 hidden) with the default text, for variants from ``gpt2deploy quantize``, so
#: that models with larger logits (GPT-2-small...xl) pass and a broken quantization (e.g. one layer's MLP input
#: weights scaled up) fails. ``benchmarks/accuracy.py`` records the measurements in benchmarks/RESULTS.md.
DEFAULTS: dict[str, dict[str, float]] = {
    "fp32": {
        "ppl_delta": 1e-4,
        "top1": 0.999,
        "top5": 0.999,
        "kl_mean": 1e-6,
        "kl_p99": 1e-5,
        "logit_max": 1e-3,
        "logit_p99": 5e-4,
        "nonfinite": 0,
        "greedy": 0.9,
        "cache_diff": 1e-3,
        "batch_diff": 1e-3,
    },
    "fp16": {
        "ppl_delta": 1e-3,
        "top1": 0.995,
        "top5": 0.995,
        "kl_mean": 2e-5,
        "kl_p99": 1e-4,
        "logit_max": 0.1,
        "logit_p99": 0.05,
        "nonfinite": 0,
        "greedy": 0.75,
        "cache_diff": 0.03,
        "batch_diff": 0.03,
    },
    "int8": {
        "ppl_delta": 0.02,
        "top1": 0.94,
        "top5": 0.93,
        "kl_mean": 6e-3,
        "kl_p99": 0.03,
        "logit_max": 2.0,
        "logit_p99": 1.5,
        "nonfinite": 0,
        "greedy": 0.25,
        "cache_diff": 1.0,
        "batch_diff": 1.5,
    },
    "int4": {
        "ppl_delta": 0.06,
        "top1": 0.84,
        "top5": 0.85,
        "kl_mean": 0.04,
        "kl_p99": 0.2,
        "logit_max": 6.0,
        "logit_p99": 5.0,
        "nonfinite": 0,
        "greedy": 0.1,
        "cache_diff": 1.0,
        "batch_diff": 1.5,
    },
}
#: Precisions without their own table use the loosest one.
FALLBACK_PRECISION = "int4"
TOLERANCE_SUFFIX = ".tol"


def defaults_for(precision: str) -> tuple[dict[str, float], str]:
    """(thresholds, precision whose table was used)."""
    used = precision if precision in DEFAULTS else FALLBACK_PRECISION
    return dict(DEFAULTS[used]), used


def parse_thresholds(items: Iterable[str] | Mapping[str, float] | None) -> tuple[dict[str, float], dict[str, float]]:
    """``NAME=VALUE`` overrides -> (gate thresholds, baseline tolerances). ``NAME.tol=VALUE`` sets a tolerance.

    UsageError naming the known gates for an unknown name, a missing '=', or a value that is not a finite number.
    """
    if items is None:
        return {}, {}
    pairs = list(items.items()) if isinstance(items, Mapping) else [_split(s) for s in items]
    gates: dict[str, float] = {}
    tols: dict[str, float] = {}
    for name, raw in pairs:
        name = str(name).strip()
        key, target = (name[: -len(TOLERANCE_SUFFIX)], tols) if name.endswith(TOLERANCE_SUFFIX) else (name, gates)
        if key not in GATES:
            raise UsageError(
                f"unknown threshold '{name}'; known: {', '.join(GATES)} (append {TOLERANCE_SUFFIX} for a baseline "
                "tolerance)"
            )
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise UsageError(f"threshold {name}={raw!r} is not a number; pass NAME=VALUE, e.g. kl_mean=0.02") from None
        if not math.isfinite(value):
            raise UsageError(f"threshold {name}={raw} is not finite; pass a finite number")
        if target is tols and value < 0:
            raise UsageError(f"tolerance {name}={raw} is negative; pass a value >= 0")
        target[key] = value
    return gates, tols


def _split(item: str) -> tuple[str, str]:
    if not isinstance(item, str) or "=" not in item:
        raise UsageError(f"threshold '{item}' is malformed; pass NAME=VALUE, e.g. --threshold kl_mean=0.02")
    name, value = item.split("=", 1)
    if not name.strip() or not value.strip():
        raise UsageError(f"threshold '{item}' is malformed; pass NAME=VALUE, e.g. --threshold kl_mean=0.02")
    return name.strip(), value.strip()


def evaluate(metrics: Mapping, thresholds: Mapping[str, float]) -> list[str]:
    """One line per failed gate, e.g. ``kl_mean 0.0312 > 0.02``."""
    failures = []
    for name, threshold in thresholds.items():
        gate = GATES[name]
        value = gate.value(metrics)
        if not gate.passes(value, threshold):
            op = ">" if gate.direction == "max" else "<"
            failures.append(f"{name} {_fmt(value)} {op} {_fmt(threshold)}")
    return failures


def tolerances(overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    tol = {name: g.tolerance for name, g in GATES.items()}
    tol.update(overrides or {})
    return tol


def _fmt(v) -> str:
    if v is None:
        return "missing"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.4g}"
