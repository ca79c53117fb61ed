"""The OpenAI completions request, validated: field types, ranges and sizes, with OpenAI-style errors.

Every bad request becomes an ``ApiError`` (status, message naming the field and the valid values, ``param``);
``error_body`` is the JSON the OpenAI client libraries parse. Nothing here touches the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    """Bounds on one request, checked before any work is done."""

    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 200_000
    max_prompts: int = 64
    max_n: int = 16
    max_rows: int = 64  # prompts x n
    max_stop: int = 4
    max_stop_chars: int = 256
    max_logprobs: int = 20


class ApiError(Exception):
    """An OpenAI-style error: ``status`` (4xx/5xx), one-line ``message`` naming the problem and the fix."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return {
            401: "authentication_error",
            404: "not_found_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
            503: "server_overloaded",
        }.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None):
    if kind is None:
        kind = ApiError(status, message).type
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class CompletionRequest:
    """A validated ``POST /v1/completions`` body. ``prompts`` holds strings or token-id lists."""

    prompts: list
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    echo: bool = False
    logprobs: int | None = None
    stream: bool = False
    include_usage: bool = True
    truncate: bool = False
    ignore_eos: bool = False
    model: str | None = None
    extra: dict = field(default_factory=dict)

    def options(self, index: int) -> dict:
        """Generation options for choice ``index`` of a prompt (choice i of a seeded request uses seed + i)."""
        sample = self.temperature > 0.0
        opts = {
            "max_new_tokens": self.max_tokens or 1,  # 0 (echo only) is fitted to the context as 1
            "do_sample": sample,
            "temperature": self.temperature if sample else 1.0,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "stop": self.stop,
            "seed": None if self.seed is None else self.seed + index,
            "truncate": self.truncate,
        }
        if self.ignore_eos:
            opts["ignore_eos"] = True
        return opts


KNOWN = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "stop",
    "seed",
    "n",
    "echo",
    "logprobs",
    "stream",
    "stream_options",
    "truncate",
    "ignore_eos",
    "user",
    "suffix",
    "best_of",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
}


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def _bool(body: dict, key: str, default: bool) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(f"'{key}' must be true or false (got {v!r:.40})", key)
    return v


def _num(body: dict, key: str, default, lo, hi, kind=float, lo_open=False):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        what = "an integer" if kind is int else "a number"
        raise _bad(f"'{key}' must be {what} (got {v!r:.40})", key)
    v = kind(v)
    low_ok = v > lo if lo_open else v >= lo
    if not low_ok or (hi is not None and v > hi):
        left = "(" if lo_open else "["
        right = f"{hi}]" if hi is not None else "inf)"
        raise _bad(f"'{key}' must be in {left}{lo}, {right} (got {v})", key)
    return v


def _is_ids(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _prompts(v, limits: Limits, vocab: int, context: int) -> list:
    if v is None:
        raise _bad("'prompt' is required: a string, a list of strings, or a list of token ids", "prompt")
    if isinstance(v, str):
        prompts = [v]
    elif _is_ids(v):
        prompts = [v]
    elif isinstance(v, list) and v and all(isinstance(p, str) for p in v):
        prompts = list(v)
    elif isinstance(v, list) and v and all(_is_ids(p) for p in v):
        prompts = [list(p) for p in v]
    else:
        raise _bad(
            "'prompt' must be a string, a non-empty list of strings, a list of token ids or a list of such lists",
            "prompt",
        )
    if len(prompts) > limits.max_prompts:
        raise _bad(f"'prompt' holds {len(prompts)} prompts; at most {limits.max_prompts} per request", "prompt")
    for p in prompts:
        if isinstance(p, str):
            if p == "":
                raise _bad("'prompt' is empty; pass at least one character of text", "prompt")
            if len(p) > limits.max_prompt_chars:
                raise _bad(
                    f"a prompt of {len(p)} characters is over the limit of {limits.max_prompt_chars}; shorten it",
                    "prompt",
                )
        else:
            if len(p) > context:
                raise _bad(f"a prompt of {len(p)} token ids is longer than the context of {context} tokens", "prompt")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise _bad(f"token id {bad[0]} in 'prompt' is outside the vocabulary (0..{vocab - 1})", "prompt")
    return prompts


def parse_completion(body, limits: Limits, vocab: int, context: int) -> CompletionRequest:
    """Validate a decoded JSON body; raises ApiError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise _bad(f"unrecognized request argument(s): {', '.join(k[:40] for k in unknown[:5])}", unknown[0][:40])
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise _bad(f"'{key}' is not supported; use 'repetition_penalty' (> 1 discourages repeats)", key)
    if body.get("logit_bias") not in (None, {}):
        raise _bad("'logit_bias' is not supported", "logit_bias")
    if body.get("suffix") not in (None, ""):
        raise _bad("'suffix' (insertion) is not supported by GPT-2 models", "suffix")
    if body.get("best_of") not in (None, 1):
        raise _bad("'best_of' other than 1 is not supported; use 'n' for several choices", "best_of")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("'user' must be a string", "user")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("'model' must be a string", "model")
    prompts = _prompts(body.get("prompt"), limits, vocab, context)
    max_tokens = _num(body, "max_tokens", 16, 0, context - 1, int)
    temperature = _num(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _num(body, "top_k", 0, 0, vocab, int)
    penalty = _num(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True)
    seed = _num(body, "seed", None, 0, 2**63 - 1, int)
    n = _num(body, "n", 1, 1, limits.max_n, int)
    logprobs = _num(body, "logprobs", None, 0, limits.max_logprobs, int)
    if n * len(prompts) > limits.max_rows:
        raise _bad(f"prompts x n = {n * len(prompts)} sequences; at most {limits.max_rows} per request", "n")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise _bad("'stop' must be a string or a list of strings", "stop")
    if len(stop) > limits.max_stop:
        raise _bad(f"'stop' holds {len(stop)} strings; at most {limits.max_stop}", "stop")
    for s in stop:
        if not s or len(s) > limits.max_stop_chars:
            raise _bad(f"each 'stop' string must have 1..{limits.max_stop_chars} characters", "stop")
    stream = _bool(body, "stream", False)
    include_usage = True
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict) or set(so) - {"include_usage"}:
            raise _bad("'stream_options' must be an object with only 'include_usage'", "stream_options")
        if "include_usage" in so and not isinstance(so["include_usage"], bool):
            raise _bad("'stream_options.include_usage' must be true or false", "stream_options")
    echo = _bool(body, "echo", False)
    if max_tokens == 0 and not echo:
        raise _bad("'max_tokens' 0 generates nothing; it is only valid with 'echo' (to score a prompt)", "max_tokens")
    return CompletionRequest(
        prompts=prompts,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=penalty,
        stop=stop,
        seed=seed,
        n=n,
        echo=echo,
        logprobs=logprobs,
        stream=stream,
        include_usage=include_usage,
        truncate=_bool(body, "truncate", False),
        ignore_eos=_bool(body, "ignore_eos", False),
        model=model,
    )
