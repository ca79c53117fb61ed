"""Time the runtime's generation loop: time-to-first-token, decode tok/s, end-to-end tok/s.

One run = one ``model.generate_ids`` call over synthetic prompts that must produce exactly ``new_tokens``
tokens per row (EOS is ignored). TTFT is the prompt step plus choosing the first token; decode tok/s counts
the remaining ``new_tokens - 1`` tokens per row over the time of the decode steps; end-to-end tok/s counts all
new tokens over the wall-clock time of the call.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import GenerationError
from .stats import summarize


@dataclass(frozen=True)
class RunTiming:
    ttft: float  # seconds: prompt step + first token
    decode_seconds: float  # seconds for the remaining new_tokens - 1 steps
    total_seconds: float  # wall clock of the whole call
    new_tokens: int  # tokens generated per row
    batch: int

    @property
    def ttft_ms(self) -> float:
        return self.ttft * 1000.0

    @property
    def decode_tok_s(self) -> float | None:
        steps = self.new_tokens - 1
        if steps < 1 or self.decode_seconds <= 0:
            return None
        return self.batch * steps / self.decode_seconds

    @property
    def e2e_tok_s(self) -> float:
        return self.batch * self.new_tokens / self.total_seconds


def generate_timed(model, prompts: list[list[int]], new_tokens: int) -> RunTiming:
    """Run the user-facing generation loop once and return its timings."""
    t0 = time.perf_counter()
    result = model.generate_ids(prompts, max_new_tokens=new_tokens, do_sample=False, ignore_eos=True)
    total = time.perf_counter() - t0
    sequences = _sequences(result)
    got = {len(s) for s in sequences}
    if got != {new_tokens} or len(sequences) != len(prompts):
        raise GenerationError(
            f"the runtime produced {sorted(got)} new tokens per row instead of {new_tokens} for {len(prompts)} prompts; "
            "the benchmark needs generation that ignores EOS"
        )
    prefill, decode = _timings(result)
    return RunTiming(ttft=prefill, decode_seconds=decode, total_seconds=total, new_tokens=new_tokens, batch=len(prompts))


def _sequences(result) -> list[list[int]]:
    seqs = getattr(result, "new_ids", None)
    if seqs is None:
        seqs = getattr(result, "ids", None)
    if seqs is None and isinstance(result, dict):
        seqs = result.get("new_ids", result.get("ids"))
    if seqs is None:
        raise GenerationError("the runtime's generate_ids returned no token ids; upgrade gpt2deploy")
    return [list(s) for s in seqs]


def _timings(result) -> tuple[float, float]:
    timings = getattr(result, "timings", None)
    if timings is None and isinstance(result, dict):
        timings = result.get("timings")
    if timings is None:
        raise GenerationError("the runtime's generate_ids returned no timings; upgrade gpt2deploy")
    get = (lambda k: timings.get(k)) if isinstance(timings, dict) else (lambda k: getattr(timings, k, None))
    prefill = get("prefill_seconds")
    decode = get("decode_seconds")
    if prefill is None or decode is None:
        raise GenerationError("the runtime's generate_ids timings lack prefill/decode seconds; upgrade gpt2deploy")
    return float(prefill), float(decode)


def measure_runs(model, prompts: list[list[int]], new_tokens: int, repeat: int, warmup: int = 1, progress=None) -> dict:
    """Warm up, then ``repeat`` timed runs. Returns summaries (median, spread) and the raw samples."""
    for i in range(warmup):
        if progress:
            progress(f"warm-up {i + 1}/{warmup}")
        generate_timed(model, prompts, new_tokens)
    runs = []
    for i in range(repeat):
        run = generate_timed(model, prompts, new_tokens)
        runs.append(run)
        if progress:
            dec = f"{run.decode_tok_s:.1f}" if run.decode_tok_s is not None else "n/a"
            progress(f"run {i + 1}/{repeat}: TTFT {run.ttft_ms:.1f} ms, decode {dec} tok/s, end-to-end {run.e2e_tok_s:.1f} tok/s")
    decode = [r.decode_tok_s for r in runs if r.decode_tok_s is not None]
    return {
        "ttft_ms": summarize([r.ttft_ms for r in runs]),
        "decode_tok_s": summarize(decode) if decode else None,
        "e2e_tok_s": summarize([r.e2e_tok_s for r in runs]),
        "samples": [
            {"ttft_ms": r.ttft_ms, "decode_tok_s": r.decode_tok_s, "e2e_tok_s": r.e2e_tok_s,
             "decode_seconds": r.decode_seconds, "total_seconds": r.total_seconds}
            for r in runs
        ],
    }
