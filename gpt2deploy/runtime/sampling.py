"""Next-token choice on a [batch, vocab] logits array, with the semantics of transformers' processors.

Order (as in transformers): repetition penalty, then for sampling temperature -> top-k -> top-p -> draw.

``top_k_filter``, ``top_p_filter`` and ``draw`` state the semantics over the whole vocabulary (and are
tested against transformers). ``choose`` computes the same result per row on the candidates only: top-k
cuts the vocabulary first, top-p sorts just enough of the most likely tokens to cover its mass, and the draw
runs over the kept tokens, so a sampled step costs a few passes over the vocabulary, not a full sort.
"""

from __future__ import annotations

import numpy as np

from .options import GenerationOptions

#: Bins of probability (quarter octaves below the largest) used to find the top-p nucleus without a full sort.
_BINS = 256
#: Block size of the two-level inverse CDF used to draw a token.
_BLOCK = 1024


# -- repetition penalty -------------------------------------------------------------------------
class SeenTokens:
    """Per row, the distinct token ids of the sequence so far (prompt + generated)."""

    def __init__(self, rows: list[list[int]], vocab: int, capacity: int):
        self.mask = np.zeros((len(rows), vocab), dtype=bool)
        self.ids = np.zeros((len(rows), capacity), dtype=np.int64)
        self.count = np.zeros(len(rows), dtype=np.int64)
        for r, row in enumerate(rows):
            for t in row:
                self.add(r, t)

    def add(self, row: int, token: int) -> None:
        if not self.mask[row, token]:
            self.mask[row, token] = True
            self.ids[row, self.count[row]] = token
            self.count[row] += 1

    def of(self, row: int) -> np.ndarray:
        return self.ids[row, : self.count[row]]


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """Tokens already in the sequence: negative logits are multiplied by ``penalty``, positive ones divided."""
    if penalty == 1.0:
        return logits
    penalised = np.where(logits < 0, logits * penalty, logits / penalty)
    return np.where(seen, penalised, logits).astype(logits.dtype, copy=False)


def _penalise_row(row: np.ndarray, ids: np.ndarray, penalty: float) -> np.ndarray:
    """``apply_repetition_penalty`` for one row, touching only the seen ids (returns a new array)."""
    out = row.copy()
    vals = out[ids]
    out[ids] = np.where(vals < 0, vals * np.float32(penalty), vals / np.float32(penalty))
    return out


# -- reference filters over the whole vocabulary ----------------------------------------------------
def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    return logits if temperature == 1.0 else logits / np.float32(temperature)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep logits >= the k-th largest of each row (ties at the boundary are kept), the rest become -inf."""
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return logits
    kth = np.partition(logits, vocab - k, axis=-1)[:, vocab - k : vocab - k + 1]
    return np.where(logits < kth, -np.inf, logits).astype(logits.dtype, copy=False)


def _nucleus(logits: np.ndarray, p: float) -> np.ndarray:
    """Positions (ascending) of the smallest set of most likely entries whose mass reaches ``p``.

    An entry is kept when the mass of the entries ranked above it is < p, so at least one is kept.
    Only the entries that can be in the nucleus are sorted: entries are binned by how far their logit is
    below the largest (quarter-nat bins); every bin above the one where the mass reaches ``p`` is wholly
    inside the nucleus and every bin below is wholly outside, so sorting the bins up to that one decides it.
    """
    n = logits.shape[0]
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs /= probs.sum()
    depth = logits.max() - logits.astype(np.float32)  # >= 0; inf for -inf logits
    depth *= np.float32(4.0)
    np.minimum(depth, np.float32(_BINS - 1), out=depth)
    bins = depth.astype(np.int32)
    mass = np.cumsum(np.bincount(bins, weights=probs, minlength=_BINS))
    last = min(int(np.searchsorted(mass, p)) + 1, _BINS - 1)  # one bin of margin against rounding
    cand = np.flatnonzero(bins <= last) if last < _BINS - 1 else np.arange(n)
    order = cand[np.argsort(-probs[cand], kind="stable")]
    ranked = probs[order]
    before = np.cumsum(ranked) - ranked  # mass ranked strictly above each candidate
    return np.sort(order[before < p])


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass reaches ``p``."""
    if p >= 1.0:
        return logits
    out = np.full_like(logits, -np.inf)
    for row in range(logits.shape[0]):
        keep = _nucleus(logits[row], p)
        out[row, keep] = logits[row, keep]
    return out


def _inverse_cdf(logits: np.ndarray, u: float) -> int:
    """Index drawn from softmax(logits) with the uniform ``u`` (-inf entries have probability 0).

    Two levels: block sums locate the block holding ``u``, a cumulative sum inside it the index.
    """
    e = np.exp(logits.astype(np.float64) - logits.max())
    n = e.shape[0]
    full = n // _BLOCK * _BLOCK
    sums = e[:full].reshape(-1, _BLOCK).sum(axis=1)
    if full < n:
        sums = np.append(sums, e[full:].sum())
    cum = np.cumsum(sums)
    target = u * cum[-1]
    b = min(int(np.searchsorted(cum, target, side="right")), len(cum) - 1)
    start = b * _BLOCK
    inner = np.cumsum(e[start : start + _BLOCK]) + (cum[b - 1] if b else 0.0)
    j = min(int(np.searchsorted(inner, target, side="right")), inner.shape[0] - 1)
    while e[start + j] == 0.0 and j > 0:  # rounding at a block's end: never return a zero-probability entry
        j -= 1
    return start + j


def draw(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One sample per row from softmax(logits), by inverse CDF in vocabulary order, one uniform per row."""
    u = rng.random(logits.shape[0])
    return np.array([_inverse_cdf(logits[r], u[r]) for r in range(logits.shape[0])], dtype=np.int64)


# -- the per-step choice ----------------------------------------------------------------------------
def sample_row(row: np.ndarray, opts: GenerationOptions, u: float) -> int:
    """``draw(top_p_filter(top_k_filter(row / T)))`` for one row and uniform ``u``, on candidates only."""
    vals = row if opts.temperature == 1.0 else row / np.float32(opts.temperature)
    idx = None  # candidate token ids, ascending; None = the whole vocabulary
    vocab = vals.shape[0]
    if 0 < opts.top_k < vocab:
        kth = np.partition(vals, vocab - opts.top_k)[vocab - opts.top_k]
        idx = np.flatnonzero(vals >= kth)
        vals = vals[idx]
    if opts.top_p < 1.0:
        keep = _nucleus(vals, opts.top_p)
        idx = keep if idx is None else idx[keep]
        vals = vals[keep]
    j = _inverse_cdf(vals, u)
    return int(j if idx is None else idx[j])


def choose(
    logits: np.ndarray, opts: GenerationOptions, rng: np.random.Generator | None, seen: SeenTokens | None
) -> np.ndarray:
    """Next token id per row (int64 [batch])."""
    if opts.repetition_penalty != 1.0 and seen is not None:
        logits = np.stack(
            [_penalise_row(logits[r], seen.of(r), opts.repetition_penalty) for r in range(logits.shape[0])]
        )
    if not opts.do_sample:
        return logits.argmax(axis=-1).astype(np.int64)
    u = rng.random(logits.shape[0])
    return np.array([sample_row(logits[r], opts, u[r]) for r in range(logits.shape[0])], dtype=np.int64)
