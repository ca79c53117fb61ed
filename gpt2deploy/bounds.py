"""Resource bounds checked before any work: thread counts, memory for a batch, finite numbers, valid text.

Each check raises a one-line :class:`UsageError` (or :class:`GenerationError` for memory) naming the
parameter and the range it accepts. Only the standard library is used (the runtime imports this).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import GenerationError, UsageError

#: Threads beyond this many per visible CPU only add contention (and thread start-up on every load).
THREADS_PER_CPU = 2
#: Share of the available memory a generation may plan to use; the rest is the process, the weights, slack.
MEMORY_SHARE = 0.8


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def max_threads() -> int:
    return max(4, THREADS_PER_CPU * cpu_count())


def check_threads(threads, name: str = "threads") -> int | None:
    """``None`` (the runtime's choice) or an int in 1..``max_threads()``."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise UsageError(f"{name} must be an integer or None (got {type(threads).__name__} {_short(threads)})")
    cap = max_threads()
    if not 1 <= threads <= cap:
        raise UsageError(
            f"{name} must be >= 1 and <= {cap} on this machine ({cpu_count()} CPUs; got {threads}); "
            "omit it to use every core"
        )
    return threads


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be True or False (got {type(value).__name__} {_short(value)})")
    return value


def check_finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number (got {_short(value)})")
    return float(value)


def check_text(text, name: str = "prompt") -> str:
    """A str that is valid Unicode (encodable as UTF-8: no lone surrogates)."""
    if not isinstance(text, str):
        raise UsageError(f"{name} must be a string (got {type(text).__name__})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(
            f"{name} is not valid Unicode (lone surrogate {text[e.start]!r} at character {e.start}); "
            "pass text that encodes as UTF-8"
        ) from None
    return text


def decode_input(data: bytes) -> tuple[str, int]:
    """Bytes read from a stream as text: invalid UTF-8 becomes U+FFFD. Returns (text, replaced count)."""
    text = data.decode("utf-8", errors="replace")
    if "\ufffd" not in text:
        return text, 0
    return text, text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, lowered by a cgroup v2 limit. None if unknown."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            room = int(limit) - used
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def generation_bytes(
    dims, batch: int, prompt_len: int, capacity: int, logits_rows: int | None = None, kv_itemsize: int = 4
) -> int:
    """Estimated peak bytes of a generation: the KV cache (twice: a step's new present beside the old past
    where the cache is not updated in place) plus the prefill's activations (logits, attention scores,
    MLP and residual tensors). ``logits_rows``: positions the prefill returns logits for (default: all)."""
    kv = 2 * dims.n_layer * batch * dims.n_head * capacity * dims.head_dim * kv_itemsize
    logits = batch * (prompt_len if logits_rows is None else logits_rows) * dims.vocab_size * 4
    scores = batch * dims.n_head * prompt_len * capacity * 4
    hidden = batch * prompt_len * dims.hidden_size * 4 * 12  # MLP (4x) and a few residual/norm buffers
    return 2 * kv + logits + scores + hidden


def check_generation_memory(
    dims, batch: int, prompt_len: int, capacity: int, logits_rows: int | None = None, what: str = "this generation"
) -> None:
    """GenerationError when the estimate (``generation_bytes``) exceeds what this machine has available."""
    need = generation_bytes(dims, batch, prompt_len, capacity, logits_rows)
    avail = available_memory()
    if avail is not None and need > MEMORY_SHARE * avail:
        raise GenerationError(
            f"{what} (batch {batch}, {capacity} tokens per row) needs about {_gb(need)} for its KV cache and "
            f"activations, more than the {_gb(avail)} of memory available; lower the batch size or token counts"
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
