"""The benchmark workload: sizes, their validation against the model, and deterministic synthetic prompts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..bounds import check_generation_memory, check_threads
from ..errors import UsageError


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. Defaults are the reference workload: batch 1, 32-token prompt, 128 new tokens."""

    prompt_tokens: int = 32
    new_tokens: int = 128
    batch: int = 1
    repeat: int = 5
    warmup: int = 1
    threads: int | None = None
    device: str = "auto"
    long_context: bool = True
    curve_points: int = 8
    curve_steps: int = 16
    curve_repeat: int = 1
    seed: int = 0
    verify: bool = True
    variants: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["variants"] = list(self.variants)
        return d

    def validate(self) -> None:
        """Checks that need no model: every size must be a positive count."""
        for name, minimum in (
            ("prompt_tokens", 1),
            ("new_tokens", 1),
            ("batch", 1),
            ("repeat", 1),
            ("warmup", 0),
            ("curve_points", 1),
            ("curve_steps", 1),
            ("curve_repeat", 1),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < minimum:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} must be an integer >= {minimum} (got {value})")
        check_threads(self.threads, "--threads")

    def validate_for(self, n_positions: int, dims=None) -> None:
        """Checks against the model's context length (and, given its ``dims``, this machine's memory)."""
        self.validate()
        if self.prompt_tokens > n_positions:
            raise UsageError(
                f"--prompt-tokens {self.prompt_tokens} is beyond the model's context of {n_positions} tokens; "
                f"use at most {n_positions - 1} so at least one token can be generated"
            )
        if self.prompt_tokens + self.new_tokens > n_positions:
            raise UsageError(
                f"--prompt-tokens {self.prompt_tokens} + --new-tokens {self.new_tokens} = "
                f"{self.prompt_tokens + self.new_tokens} is beyond the model's context of {n_positions} tokens; "
                "lower one of them"
            )
        if self.long_context and self.curve_steps + 2 > n_positions:
            raise UsageError(
                f"--curve-steps {self.curve_steps} does not fit the model's context of {n_positions} tokens; "
                f"use at most {n_positions - 2} or pass --no-long-context"
            )
        if dims is not None:
            capacity = n_positions if self.long_context else self.prompt_tokens + self.new_tokens
            check_generation_memory(
                dims, self.batch, self.prompt_tokens, capacity, what="--batch with --prompt-tokens/--new-tokens"
            )


def synthetic_prompts(
    batch: int, length: int, vocab_size: int, seed: int = 0, avoid: tuple[int, ...] = ()
) -> list[list[int]]:
    """``batch`` deterministic prompts of ``length`` token ids (same seed -> same ids on every machine).

    Ids in ``avoid`` (e.g. EOS) are never drawn. Speed does not depend on which ids they are.
    """
    rng = np.random.default_rng(seed)
    high = vocab_size
    out = []
    for _ in range(batch):
        ids = rng.integers(0, high, size=length)
        for bad in avoid:
            ids[ids == bad] = (bad + 1) % high
        out.append([int(i) for i in ids])
    return out
