"""Forward-based probes: greedy continuation, cache versus recompute, left-padded batch versus single rows.

Each probe takes models with ``forward(ids, mask, pos, past) -> (logits, present)`` and ``empty_past(batch)``,
runs them on tokens of the evaluation text (teacher-forced where a probe needs identical inputs), and returns
plain numbers. Probes also count non-finite logits so a NaN anywhere fails the check.
"""

from __future__ import annotations

import numpy as np

from .metrics import nonfinite_count

#: cache probe: prompt length and decode steps; batch probe: row lengths (fractions of the window) and steps.
CACHE_PROMPT = 48
CACHE_STEPS = 8
BATCH_FRACTIONS = (1.0, 0.75, 0.5, 0.25)
BATCH_STEPS = 4


class Counter:
    """Counts non-finite values in every logit tensor it sees."""

    def __init__(self):
        self.nonfinite = 0

    def see(self, logits: np.ndarray) -> np.ndarray:
        self.nonfinite += nonfinite_count(logits)
        return logits


def greedy(model, prompts: np.ndarray, new_tokens: int, counter: Counter | None = None) -> np.ndarray:
    """Greedy continuation of equal-length prompts [n, p] with cached decoding -> generated ids [n, new_tokens]."""
    counter = counter or Counter()
    prompts = np.asarray(prompts, dtype=np.int64)
    n, p = prompts.shape
    logits, past = model.forward(prompts, np.ones((n, p), np.int64))
    out = np.zeros((n, new_tokens), np.int64)
    for step in range(new_tokens):
        nxt = np.argmax(counter.see(logits)[:, -1], axis=-1).astype(np.int64)
        out[:, step] = nxt
        if step == new_tokens - 1:
            break
        total = p + step + 1
        logits, past = model.forward(nxt[:, None], np.ones((n, total), np.int64), past=past)
    return out


def cache_vs_recompute(model, tokens: np.ndarray, counter: Counter | None = None) -> float:
    """Max abs difference between decode-step logits (cached) and full-recompute logits at the same positions.

    ``tokens`` [L] is split into a prompt of ``L - CACHE_STEPS`` tokens followed by ``CACHE_STEPS`` teacher-forced
    single-token decode steps.
    """
    counter = counter or Counter()
    tokens = np.asarray(tokens, dtype=np.int64)[None]
    length = tokens.shape[1]
    steps = min(CACHE_STEPS, length - 1)
    full, _ = model.forward(tokens)
    counter.see(full)
    start = length - steps
    logits, past = model.forward(tokens[:, :start])
    counter.see(logits)
    worst = float(np.max(np.abs(logits[0, -1] - full[0, start - 1])))
    for i in range(start, length):
        logits, past = model.forward(tokens[:, i : i + 1], np.ones((1, i + 1), np.int64), past=past)
        counter.see(logits)
        worst = max(worst, float(np.max(np.abs(logits[0, -1] - full[0, i]))))
    return worst


def batch_vs_single(model, rows: list[np.ndarray], pad_id: int, counter: Counter | None = None) -> float:
    """Max abs logit difference between a left-padded batch and each row run alone, on real tokens only.

    Each row is a prompt followed by ``BATCH_STEPS`` teacher-forced decode steps (its last tokens), so the
    padded cache is exercised as well as the padded prompt step.
    """
    counter = counter or Counter()
    rows = [np.asarray(r, dtype=np.int64) for r in rows]
    steps = min(BATCH_STEPS, min(len(r) for r in rows) - 1)
    prompts = [r[: len(r) - steps] for r in rows]
    width = max(len(p) for p in prompts)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    logits, past = model.forward(ids, mask)
    batch_prompt = counter.see(logits)
    batch_steps = []
    for s in range(steps):
        nxt = np.array([[r[len(r) - steps + s]] for r in rows], np.int64)
        mask = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], axis=1)
        logits, past = model.forward(nxt, mask, past=past)
        batch_steps.append(counter.see(logits)[:, -1])
    worst = 0.0
    for i, (r, p) in enumerate(zip(rows, prompts, strict=False)):
        single, spast = model.forward(p[None])
        counter.see(single)
        worst = max(worst, float(np.max(np.abs(batch_prompt[i, width - len(p) :] - single[0]))))
        for s in range(steps):
            single, spast = model.forward(
                r[None, len(p) + s : len(p) + s + 1], np.ones((1, len(p) + s + 1), np.int64), past=spast
            )
            counter.see(single)
            worst = max(worst, float(np.max(np.abs(batch_steps[s][i] - single[0, -1]))))
    return worst


def batch_rows(stream: np.ndarray, window: int) -> list[np.ndarray]:
    """Rows of different lengths (fractions of the window) taken from different places in the text."""
    rows = []
    n = len(BATCH_FRACTIONS)
    for i, frac in enumerate(BATCH_FRACTIONS):
        length = max(BATCH_STEPS + 2, int(window * frac) // 2)
        start = (i * (stream.size - length)) // max(1, n - 1) if stream.size > length else 0
        rows.append(stream[start : start + length])
    return rows


def cache_tokens(stream: np.ndarray, window: int) -> np.ndarray:
    length = min(CACHE_PROMPT + CACHE_STEPS, window)
    return stream[:length]
