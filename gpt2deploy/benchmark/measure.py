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


def generate_timed(model, prompts: list[list[int]], new_tokens: int, speculative="off") -> RunTiming:
    """Run the user-facing generation loop once (greedy, EOS ignored) and return its timings.

    Speculative decoding is off unless asked for: its speed depends on the text, not on the engine alone."""
    t0 = time.perf_counter()
    result = model.generate_ids(
        prompts, max_new_tokens=new_tokens, do_sample=False, ignore_eos=True, speculative=speculative
    )
    total = time.perf_counter() - t0
    got = sorted({len(t) for t in result.tokens})
    if got != [new_tokens] or len(result.tokens) != len(prompts):
        raise GenerationError(
            f"the runtime produced {got} new tokens per row instead of {new_tokens} for {len(prompts)} prompts; "
            "the benchmark needs generation that ignores EOS"
        )
    t = result.timings
    # time to first token: buffers for the cache + the prompt step + choosing the token
    ttft = float(t.get("setup_seconds", 0.0)) + float(t["prefill_seconds"])
    return RunTiming(
        ttft=ttft,
        decode_seconds=float(t["decode_seconds"]),
        total_seconds=total,
        new_tokens=new_tokens,
        batch=len(prompts),
    )


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
            progress(
                f"run {i + 1}/{repeat}: TTFT {run.ttft_ms:.1f} ms, decode {dec} tok/s, end-to-end "
                f"{run.e2e_tok_s:.1f} tok/s"
            )
    decode = [r.decode_tok_s for r in runs if r.decode_tok_s is not None]
    return {
        "ttft_ms": summarize([r.ttft_ms for r in runs]),
        "decode_tok_s": summarize(decode) if decode else None,
        "e2e_tok_s": summarize([r.e2e_tok_s for r in runs]),
        "samples": [
            {
                "ttft_ms": r.ttft_ms,
                "decode_tok_s": r.decode_tok_s,
                "e2e_tok_s": r.e2e_tok_s,
                "decode_seconds": r.decode_seconds,
                "total_seconds": r.total_seconds,
            }
            for r in runs
        ],
    }
