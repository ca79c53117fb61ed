"""Next-token choice on a [batch, vocab] logits array, with the semantics of transformers' processors.

Order (as in transformers): repetition penalty, then for sampling temperature -> top-k -> top-p -> draw.
Every function works on float32 numpy arrays and returns a new array or token ids; nothing here is
per-token Python over the vocabulary.
"""
from __future__ import annotations

import numpy as np

from .options import GenerationOptions

#: Candidates examined before falling back to a full sort for top-p.
_TOP_P_CANDIDATES = 512


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """Tokens already in the sequence: negative logits are multiplied by ``penalty``, positive ones divided."""
    if penalty == 1.0:
        return logits
    penalised = np.where(logits < 0, logits * penalty, logits / penalty)
    return np.where(seen, penalised, logits).astype(logits.dtype, copy=False)


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    return logits if temperature == 1.0 else logits / np.float32(temperature)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep logits >= the k-th largest of each row (ties at the boundary are kept), the rest become -inf."""
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return logits
    kth = np.partition(logits, vocab - k, axis=-1)[:, vocab - k : vocab - k + 1]
    return np.where(logits < kth, -np.inf, logits).astype(logits.dtype, copy=False)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass reaches ``p``.

    A token is kept when the mass of the tokens ranked above it is < p (so at least one token stays).
    """
    if p >= 1.0:
        return logits
    probs = _softmax(logits)
    out = logits.copy()
    vocab = logits.shape[-1]
    for row in range(logits.shape[0]):
        pr = probs[row]
        m = min(vocab, _TOP_P_CANDIDATES)
        cand = np.argpartition(-pr, m - 1)[:m] if m < vocab else np.arange(vocab)
        order = cand[np.argsort(-pr[cand], kind="stable")]
        before = np.cumsum(pr[order]) - pr[order]  # mass ranked strictly above each candidate
        if m < vocab and before[-1] + pr[order[-1]] < p:
            order = np.argsort(-pr, kind="stable")  # the nucleus is wider than the candidates
            before = np.cumsum(pr[order]) - pr[order]
        keep = order[before < p]
        mask = np.ones(vocab, dtype=bool)
        mask[keep] = False
        out[row, mask] = -np.inf
    return out


def draw(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One sample per row from softmax(logits), by inverse CDF with one uniform draw per row."""
    probs = _softmax(logits)
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(logits.shape[0]) * cdf[:, -1]
    ids = np.array([np.searchsorted(cdf[r], u[r], side="right") for r in range(logits.shape[0])], dtype=np.int64)
    np.minimum(ids, logits.shape[-1] - 1, out=ids)
    return ids


def choose(logits: np.ndarray, opts: GenerationOptions, rng: np.random.Generator | None, seen: np.ndarray | None) -> np.ndarray:
    """Next token id per row (int64 [batch])."""
    if opts.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, opts.repetition_penalty)
    if not opts.do_sample:
        return logits.argmax(axis=-1).astype(np.int64)
    logits = apply_temperature(logits, opts.temperature)
    logits = top_k_filter(logits, opts.top_k)
    logits = top_p_filter(logits, opts.top_p)
    return draw(logits, rng)
