"""Generation options: defaults from the package, overrides from the caller, validated once per call."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import numpy as np

from ..bounds import check_text
from ..errors import UsageError

DEFAULT_MAX_NEW_TOKENS = 128
#: ``speculative=`` strings (a loaded draft ``Model`` is accepted too; see ``speculative``).
SPECULATIVE_MODES = ("auto", "off", "prompt-lookup")


@dataclass(frozen=True)
class GenerationOptions:
    """Everything that decides which tokens come out. Greedy unless ``do_sample``."""

    max_new_tokens: int | None = None  # None: DEFAULT_MAX_NEW_TOKENS, or what the context leaves after the prompt
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    eos_token_id: tuple[int, ...] = ()
    ignore_eos: bool = False
    truncate: bool = False
    pad_token_id: int = 0
    speculative: object = None  # None/"off", "auto", "prompt-lookup", a bool, or a loaded draft Model (see speculative)
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return () if self.ignore_eos else self.eos_token_id

    @property
    def filters_logits(self) -> bool:
        return self.repetition_penalty != 1.0 or (
            self.do_sample and (self.temperature != 1.0 or self.top_k > 0 or self.top_p < 1.0)
        )


_NAMES = {f.name for f in fields(GenerationOptions)} - {"extra"}
#: Keys of the package's generation defaults that the runtime honours.
_FROM_DEFAULTS = (
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "eos_token_id",
    "pad_token_id",
)


def _as_ids(value, name: str = "eos_token_id", vocab_size: int | None = None) -> tuple[int, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items):
        raise UsageError(f"{name} must be an int or a list of ints (got {_short(value)})")
    hi = (vocab_size - 1) if vocab_size else (1 << 31) - 1
    for v in items:
        if not 0 <= v <= hi:
            raise UsageError(f"{name} {_short(v)} is outside the vocabulary (0..{hi})")
    return tuple(int(v) for v in items)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(name: str, value, kind):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UsageError(f"{name} must be a number (got {_short(value)})")
    if not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number (got {value})")
    if kind is int and int(value) != value:
        raise UsageError(f"{name} must be a whole number (got {_short(value)})")
    return kind(value)


def build_options(defaults: dict, overrides: dict, vocab_size: int | None = None) -> GenerationOptions:
    """Merge the package's generation defaults with the caller's keyword options and validate them.

    ``vocab_size`` bounds token ids (eos_token_id, pad_token_id) when known."""
    unknown = sorted(set(overrides) - _NAMES)
    if unknown:
        raise UsageError(
            f"unknown generation option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(_NAMES))}"
        )
    values: dict = {}
    for key in _FROM_DEFAULTS:
        if defaults.get(key) is not None:
            values[key] = defaults[key]
    values.update({k: v for k, v in overrides.items() if v is not None or k == "seed"})
    if "eos_token_id" in values:
        values["eos_token_id"] = _as_ids(values["eos_token_id"], "eos_token_id", vocab_size)
    if values.get("pad_token_id") is not None:
        pad = _as_ids(values["pad_token_id"], "pad_token_id", vocab_size)
        values["pad_token_id"] = pad[0] if pad else None
    if values.get("pad_token_id") is None:
        values["pad_token_id"] = (values.get("eos_token_id") or (0,))[0]
    stop = values.get("stop", ())
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)):
        raise UsageError(f"stop must be a string or a list of strings (got {type(stop).__name__})")
    values["stop"] = tuple(stop)
    for name in ("do_sample", "ignore_eos", "truncate"):
        if name in values and not isinstance(values[name], bool):
            raise UsageError(f"{name} must be True or False (got {_short(values[name])})")
    opts = replace(GenerationOptions(), **values)
    validate(opts)
    return opts


def validate(o: GenerationOptions) -> None:
    """One-line errors that name the bad value and the valid range."""
    if o.max_new_tokens is not None and _number("max_new_tokens", o.max_new_tokens, int) < 1:
        raise UsageError(f"max_new_tokens must be >= 1 (got {o.max_new_tokens})")
    top_k = _number("top_k", o.top_k, int)
    if top_k < 0:
        raise UsageError(f"top_k must be >= 0 (0 disables it; got {o.top_k})")
    top_p = _number("top_p", o.top_p, float)
    if not 0.0 < top_p <= 1.0:
        raise UsageError(f"top_p must be in (0, 1] (1 disables it; got {o.top_p})")
    penalty = _number("repetition_penalty", o.repetition_penalty, float)
    if not penalty > 0.0:
        raise UsageError(f"repetition_penalty must be > 0 (1 disables it; got {o.repetition_penalty})")
    temperature = _number("temperature", o.temperature, float)
    if o.do_sample and not temperature > 0.0:
        raise UsageError(
            f"temperature must be > 0 when sampling (got {o.temperature}); use greedy decoding (no --do-sample) for "
            "deterministic output"
        )
    if o.seed is not None and (isinstance(o.seed, bool) or not isinstance(o.seed, int) or o.seed < 0):
        raise UsageError(f"seed must be a non-negative integer (got {o.seed!r})")
    spec = o.speculative
    if not (spec is None or isinstance(spec, bool) or spec in SPECULATIVE_MODES or hasattr(spec, "session")):
        raise UsageError(
            f"speculative must be one of {', '.join(SPECULATIVE_MODES)}, a bool or a loaded draft model (got {spec!r})"
        )
    for s in o.stop:
        if not isinstance(s, str) or s == "":
            raise UsageError(f"stop strings must be non-empty strings (got {_short(s)})")
        check_text(s, "stop string")
