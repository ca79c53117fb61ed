"""Speculative decoding with output identical to greedy decoding.

Each round a proposer guesses the next ``k`` tokens of every row; one multi-token step with past
(``KVStepper.extend``) scores the last accepted token and the ``k`` guesses at once, which gives the greedy
choice after each of them. The longest prefix of guesses that equals those choices is accepted, plus the
greedy token that follows it, so a round yields 1 to ``k + 1`` tokens, exactly the ones plain greedy decoding
would yield, and the in-place KV cache is rolled back (``KVStepper.truncate``) to the accepted positions.
In a batch every row advances by the shortest accepted prefix of the batch, which keeps the cache rectangular;
every token still comes from the row's own greedy choices.

Proposers:

* ``PromptLookup`` (``speculative="prompt-lookup"``): no second model. The last few tokens (an n-gram) are
  looked up in the prompt and the text generated so far; the tokens that followed their latest earlier
  occurrence are the guess. It costs nothing when nothing matches (a plain step runs), and pays off on
  input-grounded text (rewriting, quoting, code edits, summaries with names).
* ``DraftModel`` (``speculative=draft``, a loaded smaller package with the same tokenizer): the draft decodes
  ``k`` tokens greedily with its own rolled-back KV cache.

Greedy decoding only: sampling (``do_sample``) and the repetition penalty keep the plain loop, with a note.
Speculation also needs an in-place KV cache variant, MatMuls that keep activations in float (fp32, fp16; not
int8 or int4, which round them to int8: see ``quantized_activations``), and an ONNX Runtime that runs
multi-token steps with past; otherwise it is off with a note. Any variant can draft. It is off by default;
``"auto"`` turns prompt lookup on for greedy decoding of one prompt where those hold; the lookup runs only while
its guesses are being accepted (``k`` adapts per round, and after a run of rejected rounds it pauses), so a text
that never repeats costs about what a plain decode costs.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from .generate import DecodeClock, Generation, eos_mask, left_pad
from .kvcache import KVStepper
from .options import GenerationOptions
from .sampling import choose
from .session import DecoderSession

#: Oldest ONNX Runtime whose GroupQueryAttention runs a multi-token step with past (its query-lengths input).
MIN_ORT = (1, 32)


@dataclass
class SpeculationStats:
    proposer: str | None = None
    note: str | None = None
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0

    def as_dict(self) -> dict:
        return {
            "proposer": self.proposer,
            "note": self.note,
            "rounds": self.rounds,
            "proposed": self.proposed,
            "accepted": self.accepted,
        }


# -- proposers ----------------------------------------------------------------------------------------
class PromptLookup:
    """Guess the continuation of the last ``n`` tokens (``max_ngram`` down to ``min_ngram``) from their latest
    earlier occurrence in the prompt or the generated text."""

    name = "prompt-lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        if not 1 <= min_ngram <= max_ngram:
            raise UsageError(f"prompt lookup needs 1 <= min_ngram <= max_ngram (got {min_ngram}, {max_ngram})")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def start(self, gen: SpeculativeGeneration, ids: np.ndarray, mask: np.ndarray) -> None:
        pass

    def propose_row(self, seq: np.ndarray, k: int) -> np.ndarray:
        n_seq = seq.shape[0]
        for n in range(min(self.max_ngram, n_seq - 1), self.min_ngram - 1, -1):
            tail = seq[n_seq - n :]
            # candidate starts i < n_seq - n with seq[i:i+n] == tail; the latest one wins
            hits = np.flatnonzero(seq[: n_seq - n] == tail[0])
            for j in range(1, n):
                if hits.size == 0:
                    break
                hits = hits[seq[hits + j] == tail[j]]
            if hits.size:
                start = int(hits[-1]) + n
                return seq[start : start + k]
        return seq[:0]

    def propose(self, gen: SpeculativeGeneration, k: int) -> list[np.ndarray]:
        return [self.propose_row(gen.history(r), k) for r in range(gen.batch)]

    def accepted(self, gen: SpeculativeGeneration, n_cache: int, k: int, m: int) -> None:
        pass


class DraftModel:
    """A smaller model (same tokenizer) that decodes ``k`` greedy tokens per round on its own KV cache."""

    name = "draft"

    def __init__(self, session: DecoderSession):
        self.session = session
        self.stepper: KVStepper | None = None
        self.fed: np.ndarray | None = None  # per row, every token the draft's cache holds (left-padded)

    def start(self, gen: SpeculativeGeneration, ids: np.ndarray, mask: np.ndarray) -> None:
        self.stepper = KVStepper(self.session, gen.batch, gen.capacity)
        self.stepper.prefill(ids, mask)
        self.fed = ids

    def propose(self, gen: SpeculativeGeneration, k: int) -> list[np.ndarray]:
        s = self.stepper
        seqs = gen.padded()  # [batch, width]: prompt (left-padded) + every token decided so far
        pending = seqs[:, s.length :]
        logits = s.step(pending[:, 0]) if pending.shape[1] == 1 else s.extend(pending)[:, -1]
        out = [logits.argmax(axis=-1).astype(np.int64)]
        for _ in range(k - 1):
            out.append(s.step(out[-1]).argmax(axis=-1).astype(np.int64))
        guesses = np.stack(out, axis=1)
        return list(guesses)

    def accepted(self, gen: SpeculativeGeneration, n_cache: int, k: int, m: int) -> None:
        """The target kept ``m`` guesses after position ``n_cache``: the draft keeps what it fed of them."""
        s = self.stepper
        s.truncate(min(s.length, n_cache + 1 + m))


# -- capability -----------------------------------------------------------------------------------------
def _ort_version() -> tuple[int, int]:
    import onnxruntime as ort

    try:
        return tuple(int(x) for x in ort.__version__.split(".")[:2])  # type: ignore[return-value]
    except ValueError:
        return (0, 0)


def quantized_activations(dec: DecoderSession) -> bool:
    """True for variants whose MatMuls round activations to integers: the int8 recipe (one dynamic scale per
    call, shared by every position) and MatMulNBits at accuracy level 2-4 (int4, int8 blocks: int8 compute).

    A multi-token step computes some ops with other kernels than a single-token step (attention over several
    new positions, matrix products of several rows), whose float sums differ in the last bits; rounding the
    activations turns such a difference into a whole quantization step now and then, and the token can change.
    Greedy output identical to plain decoding then cannot be promised, so speculation stays off for them.
    """
    recipe = dec.package.variant(dec.variant).get("recipe") or {}
    details = recipe.get("details") if isinstance(recipe.get("details"), dict) else {}
    level = recipe.get("accuracy_level")
    return "dynamic" in str(details.get("activation_type", "")) or (
        isinstance(level, int) and not isinstance(level, bool) and level >= 2
    )


def unavailable(dec: DecoderSession, opts: GenerationOptions | None = None) -> str | None:
    """Why speculation cannot run for this session and these options (None: it can). Without ``opts``: why
    the session cannot serve as a draft (a draft's guesses need not be exact, only its cache must roll back)."""
    if opts is not None and opts.do_sample:
        return "speculative decoding is off for sampling (it keeps greedy output identical only)"
    if opts is not None and opts.repetition_penalty != 1.0:
        return "speculative decoding is off with a repetition penalty"
    if not dec.kv_shared or dec.device != "cpu":
        return f"speculative decoding needs a CPU variant with the in-place KV cache; variant {dec.variant} has none"
    if opts is not None and quantized_activations(dec):
        return (
            f"speculative decoding is off for variant {dec.variant}: its MatMuls round activations to int8, so a "
            "multi-token verification step cannot reproduce single-token greedy output exactly (use fp32)"
        )
    if _ort_version() < MIN_ORT:
        import onnxruntime as ort

        return (
            f"onnxruntime {ort.__version__} lacks multi-token steps with past; speculative decoding needs "
            f"{MIN_ORT[0]}.{MIN_ORT[1]} or newer"
        )
    return None


def _tokenizer_digest(model) -> str:
    digest = getattr(model, "_tokenizer_digest", None)
    if digest is None:
        digest = hashlib.sha256(model.package.tokenizer_path.read_bytes()).hexdigest()
        model._tokenizer_digest = digest
    return digest


class PlainGeneration(Generation):
    """The plain loop, with the reason speculation did not run in ``timings['speculation']``."""

    def __init__(self, dec: DecoderSession, rows: list[list[int]], opts: GenerationOptions, note: str):
        super().__init__(dec, rows, opts)
        self.note = note

    def result(self):
        self.timings["speculation"] = SpeculationStats(note=self.note).as_dict()
        return super().result()


def plan(model, rows: list[list[int]], opts: GenerationOptions) -> Generation:
    """The generation ``model`` (a loaded ``Model``) runs for these options: a speculative one where it can,
    else the plain loop (with the reason in ``timings['speculation']`` when speculation was asked for)."""
    dec = model.session
    value = "off" if opts.speculative is None else opts.speculative
    if value is False or value == "off":
        return Generation(dec, rows, opts)
    if value == "auto" and len(rows) > 1:  # a batch advances by its shortest accepted prefix: not a sure win
        return Generation(dec, rows, opts)
    why = unavailable(dec, opts)
    if why is None and len(rows) > 1 and getattr(dec, "single_row_chunks", False):
        why = (
            "this graph's attention (the onnxruntime 1.22 input schema) checks several tokens against the cache "
            "for one row at a time only: a batch decodes plainly"
        )
    if why is not None:
        return Generation(dec, rows, opts) if value == "auto" else PlainGeneration(dec, rows, opts, why)
    if value is True or value in ("auto", "prompt-lookup"):
        return SpeculativeGeneration(dec, rows, opts, PromptLookup())
    draft = value.session
    if draft.dims.vocab_size != dec.dims.vocab_size or _tokenizer_digest(value) != _tokenizer_digest(model):
        raise UsageError("the draft model's tokenizer differs from the model's; pass a draft built with the same one")
    why = unavailable(draft)
    if why is not None:
        raise UsageError(f"the draft model cannot propose: {why}")
    return SpeculativeGeneration(dec, rows, opts, DraftModel(draft))


# -- the loop -------------------------------------------------------------------------------------------
class SpeculativeGeneration(Generation):
    """``Generation`` whose steps verify proposed tokens; yields one token per row per iteration, as it does."""

    #: Guesses per round: start, ceiling; rounds with nothing accepted before the lookup pauses, and for how long.
    K_START, K_MAX = 4, 12
    MISS_LIMIT, PAUSE = 4, 8

    def __init__(self, dec: DecoderSession, rows: list[list[int]], opts: GenerationOptions, proposer):
        super().__init__(dec, rows, opts)
        self.proposer = proposer
        self.stats = SpeculationStats(proposer=proposer.name)
        width = max(len(r) for r in self.rows)
        self._seq = np.zeros((self.batch, width + self.opts.max_new_tokens), dtype=np.int64)
        self._width = width
        self._decided = 0  # tokens decided per row (emitted or about to be)
        self._starts = [width - len(r) for r in self.rows]

    def history(self, row: int) -> np.ndarray:
        """Prompt + decided tokens of ``row`` (no padding)."""
        return self._seq[row, self._starts[row] : self._width + self._decided]

    def padded(self) -> np.ndarray:
        return self._seq[:, : self._width + self._decided]

    def _decide(self, tokens: np.ndarray) -> None:
        n = tokens.shape[1]
        self._seq[:, self._width + self._decided : self._width + self._decided + n] = tokens
        self._decided += n

    def __iter__(self):
        o = self.opts
        ids, mask = left_pad(self.rows, o.pad_token_id)
        self._seq[:, : self._width] = ids
        clock = DecodeClock()
        stepper = self.stepper or KVStepper(self.dec, self.batch, self.capacity)
        clock.t_alloc = time.perf_counter()
        logits = stepper.prefill(ids, mask)
        self.proposer.start(self, ids, mask)
        is_eos = eos_mask(o, self.dec.dims.vocab_size)
        pad = np.int64(o.pad_token_id)
        new = choose(logits, o, None, None)[:, None]  # [batch, tokens decided this round]
        self._decide(new)
        stats = self.stats
        k, misses, paused_rounds = self.K_START, 0, 0
        produced = steps = 0
        while True:
            for j in range(new.shape[1]):
                nxt = new[:, j].copy()
                produced += 1
                took = self._take(nxt, pad, is_eos, produced == o.max_new_tokens)
                yield from self._yield(nxt, took, clock)
                if not self.active.any():
                    break
            if not self.active.any():
                break
            last = new[:, -1]
            room = o.max_new_tokens - produced - 1  # guesses beyond this would never be emitted
            guesses = None
            if paused_rounds:
                paused_rounds -= 1
            elif room > 0:
                rows = self.proposer.propose(self, min(k, room))
                width = max(len(g) for g in rows)
                if width:
                    guesses = np.full((self.batch, width), -1, dtype=np.int64)
                    for r, g in enumerate(rows):
                        guesses[r, : len(g)] = g
            n_cache = stepper.length
            if guesses is None:
                new = choose(stepper.step(last), o, None, None)[:, None]
                self.proposer.accepted(self, n_cache, 0, 0)
            else:
                width = guesses.shape[1]
                feed = np.concatenate([last[:, None], np.where(guesses < 0, last[:, None], guesses)], axis=1)
                scores = stepper.extend(feed)  # [batch, width + 1, vocab]
                best = scores.reshape(-1, scores.shape[-1]).argmax(axis=-1).reshape(self.batch, width + 1)
                ok = np.cumprod(guesses == best[:, :width], axis=1)
                m = int(ok.sum(axis=1).min())
                new = best[:, : m + 1].astype(np.int64)
                stepper.truncate(n_cache + 1 + m)
                self.proposer.accepted(self, n_cache, width, m)
                stats.rounds += 1
                stats.proposed += width
                stats.accepted += m
                if m == width:
                    k = min(self.K_MAX, k + 2)
                    misses = 0
                else:
                    k = max(1, m + 1)
                    misses = misses + 1 if m == 0 else 0
                    if misses >= self.MISS_LIMIT:
                        paused_rounds, misses = self.PAUSE, 0
            steps += 1
            self._decide(new)
        self._record_timings(clock, steps, stepper, mask, 0, speculation=stats.as_dict())
