"""Pure numpy metrics comparing a variant's logits with a reference's on the same token windows.

Logits are float32 [positions, vocab]. Exponentials run in float32 on values <= 0 and every sum accumulates in
float64, so results are deterministic and exact where they must be (identical logits give KL 0, Δppl 0).
The reference's softmax is computed once per window (``ReferenceLogits``) and shared by every variant.
Per-position quantities (KL, largest absolute logit difference) are kept so percentiles cover every position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TOP_K = 5


def _lse(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(exp(x - max) in float32, log-sum-exp per row in float64)."""
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, np.float32(0))
    e = np.exp(x - m)
    s = np.sum(e, axis=-1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return e, m[:, 0].astype(np.float64) + np.log(s)


def top_k_ids(logits: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Indices of the k largest logits per row, largest first; ties go to the lower index (deterministic)."""
    x = np.array(logits, dtype=np.float32)
    rows = np.arange(x.shape[0])
    out = np.empty((x.shape[0], k), np.int64)
    for i in range(k):
        out[:, i] = np.argmax(x, axis=-1)
        x[rows, out[:, i]] = -np.inf
    return out


def nonfinite_count(logits: np.ndarray) -> int:
    return int(np.size(logits) - np.count_nonzero(np.isfinite(logits)))


@dataclass
class ReferenceLogits:
    """A reference window's logits with its softmax statistics, computed once."""

    logits: np.ndarray  # float32 [n, vocab]
    probs: np.ndarray  # float32 [n, vocab]
    lse: np.ndarray  # float64 [n]
    top: np.ndarray  # int64 [n, TOP_K]

    @classmethod
    def of(cls, logits: np.ndarray) -> ReferenceLogits:
        x = np.ascontiguousarray(logits, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"logits must be [positions, vocab], got shape {x.shape}")
        e, lse = _lse(x)
        with np.errstate(invalid="ignore", divide="ignore"):
            probs = (e / np.sum(e, axis=-1, dtype=np.float64, keepdims=True)).astype(np.float32)
        return cls(x, probs, lse, top_k_ids(x))

    def log_prob(self, targets: np.ndarray) -> np.ndarray:
        t = np.asarray(targets, dtype=np.int64)
        return self.logits[np.arange(t.size), t].astype(np.float64) - self.lse[: t.size]


@dataclass
class WindowComparison:
    """Per-position comparison of one variant window against the reference."""

    kl: np.ndarray  # KL(ref || variant), nats
    absmax: np.ndarray  # largest |ref - variant| logit
    top1: np.ndarray  # bool: same argmax
    top5: np.ndarray  # overlap of the top-5 sets, 0..1
    logprob: np.ndarray  # variant log-probability of each target
    nonfinite: int


def compare_window(ref: ReferenceLogits, logits: np.ndarray, targets: np.ndarray | None = None) -> WindowComparison:
    """Compare ``logits`` [n, vocab] with the reference window.

    KL(p || q) = sum p (x - y) - lse(x) + lse(y) for reference logits x and variant logits y.
    """
    y = np.ascontiguousarray(logits, dtype=np.float32)
    if y.shape != ref.logits.shape:
        raise ValueError(f"logit shapes differ: reference {ref.logits.shape}, variant {y.shape}")
    with np.errstate(invalid="ignore", over="ignore"):
        d = ref.logits - y
        _, lse_y = _lse(y)
        kl = np.einsum("ij,ij->i", ref.probs, d, dtype=np.float64) - ref.lse + lse_y
        kl = np.where(np.isnan(kl), np.nan, np.maximum(kl, 0.0))
        absmax = np.max(np.abs(d), axis=-1).astype(np.float64)
    top = top_k_ids(y)
    top1 = top[:, 0] == ref.top[:, 0]
    top5 = (ref.top[:, :, None] == top[:, None, :]).any(-1).sum(-1) / TOP_K
    if targets is None:
        logprob = np.zeros(0)
    else:
        t = np.asarray(targets, dtype=np.int64)
        logprob = y[np.arange(t.size), t].astype(np.float64) - lse_y[: t.size]
    return WindowComparison(kl, absmax, top1, top5, logprob, nonfinite_count(y))


def kl_divergence(ref_logits: np.ndarray, var_logits: np.ndarray) -> np.ndarray:
    """KL(ref || variant) per position, in nats."""
    return compare_window(ReferenceLogits.of(ref_logits), var_logits).kl


def perplexity(logprobs: np.ndarray) -> float:
    lp = np.asarray(logprobs, dtype=np.float64)
    return _exp(-float(np.mean(lp))) if lp.size else math.nan


def percentile(values, q: float) -> float:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return 0.0
    if np.isnan(v).any():
        return math.nan
    return float(np.percentile(v, q))


def greedy_prefix_match(ref_tokens: np.ndarray, var_tokens: np.ndarray) -> np.ndarray:
    """Per row, how many generated tokens agree before the first divergence."""
    same = np.asarray(ref_tokens) == np.asarray(var_tokens)
    diverged = ~same
    return np.where(diverged.any(-1), diverged.argmax(-1), same.shape[-1]).astype(np.int64)


class LogitComparison:
    """Accumulates window comparisons of one variant; ``summary()`` gives the metrics."""

    def __init__(self):
        self.ref_logprob: list[np.ndarray] = []
        self.windows: list[WindowComparison] = []
        self.ref_nonfinite = 0

    def add(self, ref: ReferenceLogits, logits: np.ndarray, targets: np.ndarray) -> None:
        """``targets`` are the next tokens of the first ``len(targets)`` positions (perplexity is taken on those;
        the distribution metrics on every position)."""
        if not isinstance(ref, ReferenceLogits):
            ref = ReferenceLogits.of(ref)
        self.windows.append(compare_window(ref, logits, targets))
        self.ref_logprob.append(ref.log_prob(targets))
        self.ref_nonfinite += nonfinite_count(ref.logits)

    def summary(self) -> dict:
        """Perplexities, their relative difference, agreement, KL and logit-difference statistics."""
        if not self.windows:
            raise ValueError("no windows were compared")
        cat = lambda attr: np.concatenate([getattr(w, attr) for w in self.windows])  # noqa: E731
        kl, absmax = cat("kl"), cat("absmax")
        ppl_ref = perplexity(np.concatenate(self.ref_logprob))
        ppl = perplexity(cat("logprob"))
        finite = math.isfinite(ppl) and math.isfinite(ppl_ref)
        return {
            "ppl_ref": ppl_ref,
            "ppl": ppl,
            "ppl_delta": (ppl - ppl_ref) / ppl_ref if finite else math.nan,
            "top1": float(np.mean(cat("top1"))),
            "top5": float(np.mean(cat("top5"))),
            "kl_mean": float(np.mean(kl)),
            "kl_p99": percentile(kl, 99),
            "logit_max": float(np.max(absmax)),
            "logit_p99": percentile(absmax, 99),
            "nonfinite": int(sum(w.nonfinite for w in self.windows)),
            "ref_nonfinite": self.ref_nonfinite,
            "positions": int(kl.size),
        }


def _exp(x: float) -> float:
    if math.isnan(x):
        return math.nan
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
