"""Decode speed versus position: prefill to position p, then time k decode steps, for p up to the context.

Attention cost grows with the position, so a runtime whose decode step copies or recomputes the cache slows
down far more than one that does not. Each point uses the same generation loop as the main measurement.
"""

from __future__ import annotations

from .measure import generate_timed
from .workload import synthetic_prompts


def curve_positions(n_positions: int, steps: int, points: int, first: int = 32) -> list[int]:
    """Prompt lengths, increasing, the last one as close to the context end as ``steps`` allow.

    A prompt of p tokens then ``steps + 1`` new tokens ends at p + steps + 1 <= n_positions.
    """
    last = n_positions - steps - 1
    if last < 1:
        return []
    first = max(1, min(first, last))
    if points <= 1 or first == last:
        return [last]
    span = last - first
    out = sorted({first + round(span * i / (points - 1)) for i in range(points)})
    return out


def measure_curve(
    model,
    n_positions: int,
    vocab_size: int,
    batch: int = 1,
    steps: int = 16,
    points: int = 8,
    repeat: int = 1,
    seed: int = 0,
    avoid: tuple[int, ...] = (),
    progress=None,
) -> list[dict]:
    """``[{"position", "end", "decode_tok_s", "decode_ms_per_step", "prefill_ms"}]`` in increasing position.

    With ``repeat`` > 1 each point is the run with the median decode time.
    """
    out = []
    positions = curve_positions(n_positions, steps, points)
    for i, p in enumerate(positions):
        prompts = synthetic_prompts(batch, p, vocab_size, seed=seed + 1 + i, avoid=avoid)
        runs = sorted(
            (generate_timed(model, prompts, steps + 1) for _ in range(repeat)), key=lambda r: r.decode_seconds
        )
        run = runs[len(runs) // 2]
        point = {
            "position": p,
            "end": p + steps,
            "decode_tok_s": run.decode_tok_s,
            "decode_ms_per_step": run.decode_seconds / steps * 1000.0,
            "prefill_ms": run.ttft_ms,
        }
        out.append(point)
        if progress:
            progress(f"long context: position {p}..{p + steps}: {run.decode_tok_s:.1f} tok/s")
    return out
