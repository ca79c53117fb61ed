"""Continuous batching: rows join a running batch at a step boundary and leave it when done or cancelled.

A new row's prompt runs through the model alone, in chunks of at most ``prefill_chunk`` positions, one
chunk per step of the running batch (so a long prompt delays the others' next token by one chunk, not by
the whole prompt); while no row waits for a token it runs in the runtime's larger chunks. Its first token is
what it would be alone. At the step boundary after its prompt is
done it enters the batch; rows that finished or were cancelled leave it there. Every row computes what it
computes alone: its own positions, its own mask, its own position ids.

On the CPU with an in-place cache the batch lives in one allocation of ``max_rows`` slots
([slots, heads, context, head_dim] per tensor, made once): a row keeps its slot while it runs, a row that
would fall outside the smaller batch moves into a slot a leaving row freed, and a joining row's prompt
cache is copied into a free slot. Nothing else moves and nothing is reallocated.
- Graphs with ``ragged_rows`` (the ones gpt2deploy writes) take rows of different lengths in one step: each
  row's positions start at column 0 of its slot and its attention reads its own positions only.
- Older in-place graphs need one width for all rows: each row is right-aligned to it (left padding, masked)
  and the rows move when a longer row joins or when the padding would exceed ``REGROUP_SLACK`` columns.
- Other graphs (concatenating caches, other devices) rebuild one left-padded cache when the batch changes.

Each row has its own options (temperature, top-k, top-p, repetition penalty, stop strings, token budget),
its own random generator (seeded rows draw the same numbers as ``generate`` with that seed), its own
detokenizer and stop matcher, and optionally the top-N log-probabilities of every token it produces.
"""

from __future__ import annotations

import collections
import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import GenerationError
from .generate import fit_context
from .kvcache import PREFILL_CHUNK, KVStepper, regroupable
from .options import GenerationOptions
from .sampling import SeenTokens, _penalise_row, sample_row
from .session import DecoderSession
from .textstream import IncrementalText, StopMatcher, TokenBytes

#: Positions per run when computing every prompt position's log-probabilities (``prompt_logprobs``).
PROMPT_LOGPROBS_CHUNK = 128

#: Padding columns a regroup may leave rather than move every row's cache. Every row's attention reads the
#: full width (masked columns too), so a padding column costs each row a KV read per step; moving all rows
#: costs about as much as ~10 columns read for the rest of a typical generation.
REGROUP_SLACK = 16


@dataclass
class TokenLogprob:
    """One token's log-probability under the model and the ``top`` most likely alternatives there."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass
class Emit:
    """What one row produced in one step: its token, the text that token completes (possibly ""),
    its log-probability (when asked) and, on its last token, why it finished."""

    row: Row
    token: int
    text: str
    logprob: TokenLogprob | None = None
    finish: str | None = None  # "eos", "stop", "length" or "cancelled"


@dataclass
class Row:
    """One sequence in the batch. ``ids`` is the prompt (already fitted to the context)."""

    ids: list[int]
    opts: GenerationOptions
    logprobs: int | None = None  # top-N per generated token; None: no log-probabilities
    key: object = None  # the caller's handle
    tokens: list[int] = field(default_factory=list)
    reason: str | None = None
    truncated: int = 0
    serial: int = 0

    @property
    def done(self) -> bool:
        return self.reason is not None

    @property
    def length(self) -> int:
        """Positions this row holds in the cache: its prompt and every produced token but the last."""
        return len(self.ids) + len(self.tokens) - 1


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float32, copy=False)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum(dtype=np.float64)).astype(np.float32))


def top_logprobs(logp: np.ndarray, n: int) -> list[tuple[int, float]]:
    if n <= 0:
        return []
    n = min(n, logp.shape[0])
    idx = np.argpartition(-logp, n - 1)[:n]
    idx = idx[np.argsort(-logp[idx], kind="stable")]
    return [(int(i), float(logp[i])) for i in idx]


class _RowState:
    """The per-row machinery: random generator, seen tokens, detokenizer and stop matcher."""

    def __init__(self, row: Row, token_bytes: TokenBytes, vocab: int):
        o = row.opts
        self.rng = np.random.default_rng(o.seed) if o.do_sample else None
        self.seen = (
            SeenTokens([row.ids], vocab, len(row.ids) + o.max_new_tokens) if o.repetition_penalty != 1.0 else None
        )
        self.eos = set(o.eos_ids)
        self.text = IncrementalText(token_bytes)
        self.stops = StopMatcher(o.stop)


class _Prefill:
    """A row whose prompt is running through the model, chunk by chunk."""

    def __init__(self, row: Row):
        self.row = row
        self.done = 0
        self.past: list[np.ndarray] | None = None


class Batcher:
    """``add(row)`` queues a row's prompt; ``step()`` runs one chunk of a waiting prompt (its row's first
    ``Emit`` when the prompt is done), lets prefilled rows in and finished rows out, and advances every row
    in the batch by one token; ``cancel(row)`` makes a row leave at the next boundary.

    Not thread-safe: one thread (the server's decode loop) drives it.
    """

    def __init__(
        self, dec: DecoderSession, token_bytes: TokenBytes, prefill_chunk: int = PREFILL_CHUNK, max_rows: int = 8
    ):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 (got {prefill_chunk})")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 (got {max_rows})")
        self.dec = dec
        self.max_rows = max_rows  # cache slots allocated once; more rows than this reallocate
        # rows of different lengths, each from column 0 of its slot (graphs that take them; else left padding)
        self.regroupable = regroupable(dec)  # what every stepper of this batch will say
        self.ragged = self.regroupable and dec.ragged_rows
        self.token_bytes = token_bytes
        self.prefill_chunk = prefill_chunk
        self.vocab = dec.dims.vocab_size
        self.rows: list[Row] = []  # the rows in the stepper, in its order
        self.prefilling: collections.deque[_Prefill] = collections.deque()
        self.joining: list[Row] = []  # prefilled, entering at the next step boundary
        self.stepper: KVStepper | None = None
        self._solo: dict[int, tuple[list[np.ndarray], int]] = {}  # serial -> (prompt cache, length)
        self._state: dict[int, _RowState] = {}
        self._serials = itertools.count(1)
        self.rebuilds = 0
        self.decode_steps = 0
        self.decode_rows = 0  # tokens produced by decode steps (a row's first token comes from its prompt run)
        self.prompt_seconds = 0.0  # in prompt runs
        self.decode_seconds = 0.0  # in batch changes and decode steps

    # -- membership -------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Rows that hold a place: prefilling, joining and running rows not yet finished."""
        return sum(1 for r in self.rows if not r.done) + sum(
            1 for r in (*self.joining, *(p.row for p in self.prefilling)) if not r.done
        )

    def fit(self, ids: list[int], opts: GenerationOptions) -> tuple[list[int], int, GenerationOptions]:
        """The prompt fitted to the context (see ``fit_context``): (ids, tokens dropped, options with budget)."""
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab - 1})")
        rows, dropped, opts = fit_context([ids], opts, self.dec.dims.n_positions)
        return rows[0], dropped[0], opts

    def add(self, row: Row) -> None:
        """Queue ``row``: its prompt runs in the next steps, then it joins the batch."""
        row.serial = next(self._serials)
        self._state[row.serial] = _RowState(row, self.token_bytes, self.vocab)
        self.prefilling.append(_Prefill(row))

    def _prefill_some(self) -> list[Emit]:
        """One chunk of the first waiting prompt; its row's first token when that prompt is done."""
        while self.prefilling and self.prefilling[0].row.done:  # cancelled while waiting
            self._forget(self.prefilling.popleft().row)
        if not self.prefilling:
            return []
        p = self.prefilling[0]
        row, n = p.row, len(p.row.ids)
        # chunks only bound how long rows waiting for their next token wait; with none, the prompt runs in the
        # runtime's own chunks (faster, and the first token sooner)
        idle = all(r.done for r in (*self.rows, *self.joining))
        part = row.ids[p.done : p.done + (max(self.prefill_chunk, PREFILL_CHUNK) if idle else self.prefill_chunk)]
        mask = np.ones((1, p.done + len(part)), dtype=np.int64)
        logits, p.past = self.dec.forward(np.asarray([part], dtype=np.int64), mask, past=p.past, logits_to_keep=1)
        p.done += len(part)
        if p.done < n:
            return []
        self.prefilling.popleft()
        emit = self._choose(row, self._state[row.serial], logits[0, -1].astype(np.float32, copy=False))
        if row.done:
            self._forget(row)
        else:
            self._solo[row.serial] = (p.past, n)
            self.joining.append(row)
        return [emit]

    def cancel(self, row: Row) -> Emit | None:
        """Finish ``row`` now ("cancelled"); it leaves the batch at the next step boundary."""
        if row.done:
            return None
        row.reason = "cancelled"
        return Emit(row, -1, self._flush(row), finish="cancelled")

    def live(self) -> list[Row]:
        """Every row the batcher holds: prefilling, joining and in the batch."""
        return [*(p.row for p in self.prefilling), *self.joining, *self.rows]

    def reset(self) -> None:
        """Forget every row (after a failed run)."""
        self.rows, self.joining, self.stepper = [], [], None
        self.prefilling.clear()
        self._solo.clear()
        self._state.clear()

    def _forget(self, row: Row) -> None:
        self._state.pop(row.serial, None)
        self._solo.pop(row.serial, None)

    def _rebuild(self) -> None:
        """Drop finished rows, let joining rows in: the live rows, left-padded to one width."""
        keep = [r for r in self.rows if not r.done]
        new = [r for r in self.joining if not r.done]
        for r in [*self.rows, *self.joining]:
            if r.done:
                self._forget(r)
        self.joining = []
        st = self.stepper
        full = st is not None and st.length >= st.capacity
        if not new and len(keep) == len(self.rows) and not full:
            return
        rows = keep + new
        if not rows:
            self.rows, self.stepper = [], None
            return
        if st is not None and st.regroupable and len(rows) <= st.slots:
            self._regroup(keep, new)
        else:
            self._rebuild_copy(rows)
        self.rebuilds += 1

    def _regroup(self, keep: list[Row], new: list[Row]) -> None:
        """In place, in the running cache's slots: a row that stays keeps its slot, a row beyond the new batch
        moves into a slot that a leaving row freed, a joining row's prompt cache is copied into a free slot.
        The width stays (padding columns are masked) unless a joining row needs more, the padding exceeds
        ``REGROUP_SLACK`` or the cache is full; then every row moves to the width of the longest."""
        st = self.stepper
        slot_of = {r.serial: i for i, r in enumerate(self.rows)}
        b = len(keep) + len(new)
        order: list[Row | None] = [None] * b
        for r in keep:
            if slot_of[r.serial] < b:
                order[slot_of[r.serial]] = r
        free = iter([i for i in range(b) if order[i] is None])
        for r in [*(r for r in keep if slot_of[r.serial] >= b), *new]:
            order[next(free)] = r
        if self.ragged:
            self._place_ragged(st, order, st, slot_of)
            return
        old_w = st.length
        needed = max(r.length for r in order)
        width = old_w if needed <= old_w < st.capacity and old_w - needed <= REGROUP_SLACK else needed
        views = st.slot_views()
        mask = np.zeros((b, width), dtype=np.int64)
        for i, r in enumerate(order):
            n = r.length
            if r.serial in slot_of:
                j = slot_of[r.serial]
                if j != i or width != old_w:  # a same-slot shift overlaps itself: numpy copies through a buffer
                    for v in views:
                        v[i, :, width - n : width] = v[j, :, old_w - n : old_w]
            else:
                src, end = self._solo.pop(r.serial)
                for v, s in zip(views, src, strict=True):
                    v[i, :, width - n : width] = s[0, :, end - n : end]
            mask[i, width - n :] = 1
        st.regroup(mask, np.array([r.length - 1 for r in order], dtype=np.int64))
        self.rows = order

    def _place_ragged(self, stepper: KVStepper, order: list[Row], old: KVStepper | None, slot_of: dict) -> None:
        """Rows of ``order`` into slots 0.. of ``stepper``, each from column 0: a running row from its slot
        ``slot_of[serial]`` of ``old`` (nothing to do when that is the same slot of the same cache), a joining
        row from its prompt cache; then ``stepper`` runs them."""
        views = stepper.slot_views()
        src = views if old is stepper else old.slot_views() if old is not None else []
        for i, r in enumerate(order):
            n = r.length
            if r.serial in slot_of:
                j = slot_of[r.serial]
                if j != i or old is not stepper:
                    for v, s in zip(views, src, strict=True):
                        v[i, :, :n] = s[j, :, :n]
            else:
                prompt, end = self._solo.pop(r.serial)
                for v, s in zip(views, prompt, strict=True):
                    v[i, :, :n] = s[0, :, end - n : end]
        stepper.regroup_ragged(np.array([r.length for r in order], dtype=np.int64))
        self.stepper, self.rows = stepper, order

    def _rebuild_copy(self, rows: list[Row]) -> None:
        """Into a new cache sized for the live rows (or ``max_rows`` slots when it can regroup later), every row
        right-aligned to the longest row's width."""
        width = max(r.length for r in rows)
        d = self.dec.dims
        b = len(rows)
        old = self.stepper
        old_index = {r.serial: i for i, r in enumerate(self.rows)}
        stepper = KVStepper(self.dec, max(b, self.max_rows) if self.regroupable else b, d.n_positions)
        if self.ragged:
            self._place_ragged(stepper, rows, old, old_index)
            return
        old_kv = old.read_kv() if old is not None else None
        old_len = old.length if old is not None else 0
        if self.regroupable:
            kv = [v[:b, :, :width] for v in stepper.slot_views()]
        else:
            views = stepper.kv_views(width)  # CPU: rows are copied straight into the new buffers
            kv = views or [np.zeros((b, d.n_head, width, d.head_dim), stepper.kv_dtype) for _ in self.dec.past_names]
        mask = np.zeros((b, width), dtype=np.int64)
        for i, r in enumerate(rows):
            n = r.length
            if r.serial in old_index:
                j, src, end = old_index[r.serial], old_kv, old_len
            else:
                src, end = self._solo.pop(r.serial)
                j = 0
            for dst, s in zip(kv, src, strict=True):
                dst[i, :, : width - n] = 0  # masked, but never garbage (0 x NaN is NaN)
                dst[i, :, width - n :] = s[j, :, end - n : end]
            mask[i, width - n :] = 1
        last = np.array([r.length - 1 for r in rows], dtype=np.int64)
        if self.regroupable:
            stepper.regroup(mask, last)
        else:
            stepper.resume(None if views else kv, mask, last)
        self.stepper, self.rows = stepper, rows

    # -- steps -------------------------------------------------------------------------------
    def step(self) -> list[Emit]:
        """One chunk of a waiting prompt, then let joining rows in and finished rows out, then one token for
        every row in the batch."""
        t0 = time.perf_counter()
        emits = self._prefill_some()
        t1 = time.perf_counter()
        self.prompt_seconds += t1 - t0
        self._rebuild()
        if not self.rows:
            self.decode_seconds += time.perf_counter() - t1
            return emits
        tokens = np.array([r.tokens[-1] for r in self.rows], dtype=np.int64)
        logits = self.stepper.step(tokens)
        self.decode_steps += 1
        self.decode_rows += len(self.rows)
        emits += [self._choose(r, self._state[r.serial], logits[i]) for i, r in enumerate(self.rows)]
        self.decode_seconds += time.perf_counter() - t1
        return emits

    def _choose(self, row: Row, state: _RowState, logits: np.ndarray) -> Emit:
        o = row.opts
        lg = logits
        if state.seen is not None:
            lg = _penalise_row(lg, state.seen.of(0), o.repetition_penalty)
        if not o.do_sample:
            tok = int(lg.argmax())
        else:
            tok = sample_row(lg, o, float(state.rng.random()))
        lp = None
        if row.logprobs is not None:
            logp = log_softmax(logits)
            lp = TokenLogprob(tok, float(logp[tok]), top_logprobs(logp, row.logprobs))
        row.tokens.append(tok)
        if state.seen is not None:
            state.seen.add(0, tok)
        if tok in state.eos:
            row.reason = "eos"
        elif len(row.tokens) >= o.max_new_tokens:
            row.reason = "length"
        piece = "" if tok in state.eos else state.text.feed(tok)
        if row.done:
            piece += state.text.flush()
        text, stopped = state.stops.feed(piece)
        if stopped and row.reason is None:
            row.reason = "stop"
        if row.done:
            text += state.stops.flush()
        return Emit(row, tok, text, lp, row.reason)

    def _flush(self, row: Row) -> str:
        state = self._state.get(row.serial)
        if state is None:
            return ""
        text, _ = state.stops.feed(state.text.flush())
        return text + state.stops.flush()

    # -- prompt scoring ------------------------------------------------------------------------
    def prompt_logprobs(self, ids: list[int], top: int) -> list[TokenLogprob]:
        """Each prompt token's log-probability given the tokens before it (None for the first), with the
        ``top`` most likely alternatives: the prompt runs in chunks, every position's logits kept."""
        out = [TokenLogprob(ids[0], None, None)]
        past = None
        done = 0
        while done < len(ids):
            part = ids[done : done + PROMPT_LOGPROBS_CHUNK]
            x = np.asarray([part], dtype=np.int64)
            mask = np.ones((1, done + len(part)), dtype=np.int64)
            logits, past = self.dec.forward(x, mask, past=past, logits_to_keep=0)
            for k in range(len(part)):
                nxt = done + k + 1
                if nxt >= len(ids):
                    break
                logp = log_softmax(logits[0, k])
                out.append(TokenLogprob(ids[nxt], float(logp[ids[nxt]]), top_logprobs(logp, top)))
            done += len(part)
        return out
