"""The generation loop over token ids: one prefill, then one token per step until every row is done.

Rows of a batch are left-padded; position ids come from the attention mask, so each row computes what it
would compute alone. Rows finish independently (EOS, a stop string seen by the caller, or the token budget);
on the CPU a finished row leaves the batch at the next step (``KVStepper.keep_rows``), elsewhere it keeps
its slot and its tokens are ignored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from ..bounds import check_generation_memory
from ..errors import GenerationError
from .kvcache import KVStepper
from .options import DEFAULT_MAX_NEW_TOKENS, GenerationOptions
from .sampling import SeenTokens, choose
from .session import DecoderSession


@dataclass
class GenerationResult:
    """Token ids (and text, when generated from text) per row, with finish reasons and timings."""

    tokens: list[list[int]]
    prompt_tokens: list[int]
    finish_reasons: list[str]
    timings: dict
    texts: list[str] | None = None
    truncated: list[int] = field(default_factory=list)

    @property
    def new_tokens(self) -> list[int]:
        return [len(t) for t in self.tokens]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def fit_context(
    rows: list[list[int]], opts: GenerationOptions, n_positions: int
) -> tuple[list[list[int]], list[int], GenerationOptions]:
    """Check prompt + max_new_tokens against the context; left-truncate only when ``opts.truncate``.

    Without an explicit ``max_new_tokens`` the budget is DEFAULT_MAX_NEW_TOKENS or what the context leaves.
    Returns the (possibly truncated) rows, the tokens dropped per row, and the options with the budget set.
    """
    if not rows:
        raise GenerationError("no prompts given; pass at least one prompt")
    for i, r in enumerate(rows):
        if len(r) == 0:
            which = "the prompt" if len(rows) == 1 else f"prompt {i}"
            raise GenerationError(f"{which} is empty; pass at least one token of text")
    if opts.max_new_tokens is None:
        room = n_positions - max(len(r) for r in rows)
        opts = replace(opts, max_new_tokens=max(1, min(DEFAULT_MAX_NEW_TOKENS, room)))
    if opts.max_new_tokens >= n_positions:
        raise GenerationError(
            f"max_new_tokens {opts.max_new_tokens} leaves no room for a prompt in the model's context of "
            f"{n_positions} tokens; "
            f"pass max_new_tokens <= {n_positions - 1}"
        )
    budget = n_positions - opts.max_new_tokens
    dropped = [max(0, len(r) - budget) for r in rows]
    worst = max(range(len(rows)), key=lambda i: len(rows[i]))
    if dropped[worst]:
        if not opts.truncate:
            n = len(rows[worst])
            raise GenerationError(
                f"prompt of {n} tokens + max_new_tokens {opts.max_new_tokens} exceeds the model's context of "
                f"{n_positions} tokens; "
                f"shorten the prompt, lower max_new_tokens, or allow left-truncation (--truncate / truncate=True)"
            )
        rows = [r[d:] for r, d in zip(rows, dropped, strict=False)]
    return rows, dropped, opts


def eos_mask(opts: GenerationOptions, vocab: int) -> np.ndarray | None:
    """[vocab] bool, True at the end-of-sequence ids of ``opts``; None when there are none."""
    ids = [t for t in opts.eos_ids if 0 <= t < vocab]
    if not ids:
        return None
    mask = np.zeros(vocab, dtype=bool)
    mask[ids] = True
    return mask


@dataclass
class DecodeClock:
    """When a decoding loop started, allocated, yielded its first token, and how long the caller held it."""

    t0: float = field(default_factory=time.perf_counter)
    t_alloc: float | None = None
    t_prefill: float | None = None
    t_first: float | None = None
    paused: float = 0.0  # time the caller spent between steps (decoding text, printing): not generation time


class Generation:
    """Iterate to advance: each step yields the new token per row (int64 [batch]) and which rows took one.

    The caller may ``finish(row, reason)`` between steps (stop strings); ``result()`` when iteration ends.
    """

    def __init__(self, dec: DecoderSession, rows: list[list[int]], opts: GenerationOptions):
        for r in rows:
            bad = [t for t in r if not 0 <= t < dec.dims.vocab_size]
            if bad:
                raise GenerationError(f"token id {bad[0]} is outside the vocabulary (0..{dec.dims.vocab_size - 1})")
        self.dec = dec
        self.rows, self.dropped, self.opts = fit_context(rows, opts, dec.dims.n_positions)
        opts = self.opts
        self.batch = len(self.rows)
        self.tokens: list[list[int]] = [[] for _ in range(self.batch)]
        self.reasons: list[str | None] = [None] * self.batch
        self.active = np.ones(self.batch, dtype=bool)
        self.timings: dict = {}
        self.capacity = max(len(r) for r in self.rows) + opts.max_new_tokens
        longest = max(len(r) for r in self.rows)
        check_generation_memory(dec.dims, self.batch, longest, self.capacity, 1 if dec.keeps_logits else None)
        self.stepper: KVStepper | None = None  # the caller may lend one with buffers to reuse

    def finish(self, row: int, reason: str) -> None:
        if self.active[row]:
            self.active[row] = False
            self.reasons[row] = reason

    # -- the bookkeeping every decoding loop shares (``__iter__`` here, ``speculative``) --------------------
    def _take(self, nxt: np.ndarray, pad, is_eos: np.ndarray | None, last: bool, seen=None) -> np.ndarray:
        """Record ``nxt`` (one token per row; ``pad`` put in for finished rows), finish rows at an EOS token
        (``is_eos``: a vocabulary mask, None when there is none) and, on the ``last`` token, at the budget.
        Returns which rows took a token."""
        took = self.active.copy()
        if not took.all():
            nxt[~took] = pad
        for r in np.flatnonzero(took):
            self.tokens[r].append(int(nxt[r]))
            if seen is not None:
                seen.add(r, int(nxt[r]))
        if is_eos is not None:
            for r in np.flatnonzero(took & is_eos[nxt]):
                self.finish(int(r), "eos")
        if last:
            for r in np.flatnonzero(self.active):
                self.finish(int(r), "length")
        return took

    def _yield(self, nxt: np.ndarray, took: np.ndarray, clock: DecodeClock):
        """Hand one step to the caller; the time the caller keeps it is not generation time."""
        if clock.t_prefill is None:
            clock.t_prefill = time.perf_counter()
        t_yield = time.perf_counter()
        yield nxt, took
        if clock.t_first is None:
            clock.t_first = time.perf_counter()
        else:
            clock.paused += time.perf_counter() - t_yield

    def _record_timings(
        self, clock: DecodeClock, steps: int, stepper: KVStepper, mask: np.ndarray, shrinks: int, **extra
    ) -> None:
        decode_s = max(0.0, time.perf_counter() - clock.t_first - clock.paused) if steps else 0.0
        new_tokens = sum(len(t) for t in self.tokens)
        decode_tokens = new_tokens - self.batch  # the first token of each row comes from the prefill
        self.timings = {
            "setup_seconds": clock.t_alloc - clock.t0,
            "prefill_seconds": clock.t_prefill - clock.t_alloc,
            "decode_seconds": decode_s,
            "decode_steps": steps,
            "decode_run_seconds": stepper.run_seconds,
            "prompt_tokens": int(mask.sum()),
            "new_tokens": new_tokens,
            "batch": self.batch,
            "batch_shrinks": shrinks,
            "decode_tokens_per_second": (decode_tokens / decode_s) if decode_s > 0 else None,
            "overhead_ms_per_step": ((decode_s - stepper.run_seconds) / steps * 1e3) if steps else None,
            **extra,
        }

    def __iter__(self):
        o = self.opts
        ids, mask = left_pad(self.rows, o.pad_token_id)
        clock = DecodeClock()
        stepper = self.stepper or KVStepper(self.dec, self.batch, self.capacity)
        clock.t_alloc = time.perf_counter()
        logits = stepper.prefill(ids, mask)
        rng = np.random.default_rng(o.seed) if o.do_sample else None
        seen = SeenTokens(self.rows, self.dec.dims.vocab_size, self.capacity) if o.repetition_penalty != 1.0 else None
        is_eos = eos_mask(o, self.dec.dims.vocab_size)
        pad = np.int64(o.pad_token_id)
        live = np.arange(self.batch)  # the rows the stepper computes, in its order
        shrinks = 0
        steps = 0
        for produced in range(o.max_new_tokens):
            if live.size == self.batch:
                nxt = choose(logits, o, rng, seen)
            else:
                nxt = np.full(self.batch, pad, dtype=np.int64)
                nxt[live] = choose(logits, o, rng, None if seen is None else _LiveRows(seen, live))
            took = self._take(nxt, pad, is_eos, produced + 1 == o.max_new_tokens, seen)
            yield from self._yield(nxt, took, clock)
            if not self.active.any():
                break
            still = self.active[live]
            if not still.all() and stepper.keep_rows(np.flatnonzero(still)):
                live, shrinks = live[still], shrinks + 1
            logits = stepper.step(nxt[live])
            steps += 1
        self._record_timings(clock, steps, stepper, mask, shrinks)

    def result(self) -> GenerationResult:
        return GenerationResult(
            tokens=self.tokens,
            prompt_tokens=[len(r) for r in self.rows],
            finish_reasons=[r or "length" for r in self.reasons],
            timings=self.timings,
            truncated=self.dropped,
        )


class _LiveRows:
    """The seen tokens of the rows still in the batch, indexed as the stepper orders them."""

    def __init__(self, seen: SeenTokens, live: np.ndarray):
        self.seen, self.live = seen, live

    def of(self, row: int) -> np.ndarray:
        return self.seen.of(int(self.live[row]))


def generate_ids(dec: DecoderSession, rows: list[list[int]], opts: GenerationOptions) -> GenerationResult:
    gen = Generation(dec, rows, opts)
    for _ in gen:
        pass
    return gen.result()
