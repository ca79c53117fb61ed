"""``gpt2deploy.load(path)``: a package on a device, ready to generate text or token ids.

Only onnxruntime, numpy and tokenizers are imported here (never torch, transformers or onnx).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from ..bounds import check_bool, check_text, check_threads
from ..compat import load_error, requirement_error, runtime_problem
from ..errors import GenerationError, Gpt2DeployError, PackageError, UsageError, VariantError
from ..package import Package
from .generate import Generation, GenerationResult
from .kvcache import KVStepper
from .options import GenerationOptions, build_options
from .providers import resolve_device
from .select import select_variant
from .session import DecoderSession
from .textstream import IncrementalText, StopMatcher, TokenBytes


class PerformanceWarning(UserWarning):
    """The requested configuration works but is known to be slow."""


class AccuracyWarning(UserWarning):
    """The requested variant failed its accuracy gate."""


def load(
    path, variant: str | None = None, device: str = "auto", threads: int | None = None, verify: bool = True
) -> Model:
    """Open the package at ``path`` and load one variant into ONNX Runtime.

    ``variant=None`` picks one for the device (see ``select_variant``); ``device`` is 'auto', 'cpu' or 'cuda';
    ``threads`` sets ONNX Runtime's intra-op threads; ``verify`` checks the sha256 of the shared files and of
    the chosen variant first and refuses to load on a mismatch (IntegrityError).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"path must be a package directory (str or os.PathLike; got {type(path).__name__})")
    if variant is not None and not isinstance(variant, str):
        raise UsageError(f"variant must be a variant name or None (got {type(variant).__name__})")
    if not isinstance(device, str):
        raise UsageError(f"device must be one of 'auto', 'cpu', 'cuda' (got {type(device).__name__})")
    threads = check_threads(threads)
    check_bool(verify, "verify")
    pkg = Package.open(path)  # the manifest is validated here, before anything else is read
    dev = resolve_device(device)
    notes: list[str] = []
    if variant is None:
        name, reason = select_variant(pkg.manifest, dev)
        spec = pkg.variant_spec(name)
    else:
        spec = pkg.variant_spec(variant)
        name, reason = variant, "requested"
        if dev == "cpu" and name == "fp16":
            notes.append("fp16 runs slower than fp32 on the CPU execution provider; it is meant for CUDA")
            warnings.warn(notes[-1], PerformanceWarning, stacklevel=2)
        if dev == "cuda" and not spec.runs_on("CUDAExecutionProvider"):
            raise VariantError(
                f"variant {name} is built for {', '.join(spec.providers)} only (its fused attention has no CUDA "
                "kernel); "
                "use --device cpu, the fp16 variant, or re-export with --portable"
            )
        if runtime_problem(pkg.variant(name)):
            raise VariantError(requirement_error(name, pkg.variant(name), pkg.manifest))
        if spec.gate_failed:
            notes.append(
                f"variant {name} failed its accuracy gate (see 'gpt2deploy inspect'); its output may differ from fp32"
            )
            warnings.warn(notes[-1], AccuracyWarning, stacklevel=2)
    if verify:
        pkg.check_integrity([name])  # spec.graph is one of the variant's files: the graph run is the one hashed
    else:
        pkg.contained(name)
    if not pkg.tokenizer_path.is_file():
        raise PackageError(f"package {pkg.root} has no tokenizer.json; rebuild it with 'gpt2deploy export' or 'build'")
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(pkg.tokenizer_path))
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise PackageError(
            f"{pkg.tokenizer_path} cannot be read ({str(e).splitlines()[0][:120]}); rebuild the package"
        ) from None
    if not spec.graph.is_file():
        raise VariantError(f"variant {name}'s graph {spec.file} is missing from {pkg.root}; rebuild the package")
    try:
        session = DecoderSession(pkg, spec, dev, threads)
    except Gpt2DeployError:
        raise
    except Exception as e:  # onnxruntime's own exception types (invalid graph, provider failure)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        lacking = load_error(name, str(e), pkg.manifest)
        if lacking:
            raise VariantError(lacking) from None
        raise PackageError(
            f"ONNX Runtime cannot load variant {name} ({spec.file}): {first}; run 'gpt2deploy verify' or rebuild "
            "the package"
        ) from None
    return Model(pkg, session, tokenizer, reason, notes)


class Model:
    """A loaded variant: ``generate``, ``stream``, ``generate_ids``; ``.variant``, ``.device``,
    ``.selection_reason``."""

    def __init__(self, package: Package, session: DecoderSession, tokenizer, selection_reason: str, notes: list[str]):
        self.package = package
        self.session = session
        self.tokenizer = tokenizer
        self.variant = session.variant
        self.device = session.device
        self.dims = package.dims
        self.selection_reason = selection_reason
        self.notes = notes
        self.token_bytes = TokenBytes(tokenizer)
        self._pool: list[KVStepper] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<gpt2deploy.Model {self.package.root.name} variant={self.variant} device={self.device}>"

    # -- text <-> ids -----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(check_text(text, "prompt")).ids

    def decode(self, ids: Sequence[int]) -> str:
        from .textstream import decode

        return decode(self.token_bytes, [int(i) for i in ids])

    def options(self, **opts) -> GenerationOptions:
        """The effective options: the package's generation defaults overridden by ``opts`` (validated)."""
        defaults = self.package.generation_defaults
        defaults.setdefault("eos_token_id", self.dims.eos_token_id)
        return build_options(defaults, opts, vocab_size=self.dims.vocab_size)

    # -- generation -------------------------------------------------------------------------
    def generate(self, prompt_or_prompts: str | Sequence[str], **opts) -> str | list[str]:
        """Continue one prompt (returns a str) or a batch of prompts (returns a list of str).

        Options: max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, stop, seed,
        ignore_eos, eos_token_id, truncate, speculative. Greedy unless do_sample=True. The prompt is not repeated.
        """
        single = isinstance(prompt_or_prompts, str)
        result = self.generate_result(prompt_or_prompts, **opts)
        return result.texts[0] if single else result.texts

    def generate_result(self, prompt_or_prompts: str | Sequence[str], **opts) -> GenerationResult:
        """Like ``generate`` but returns the full result: texts, token ids, finish reasons, timings."""
        if isinstance(prompt_or_prompts, str):
            prompts = [prompt_or_prompts]
        elif isinstance(prompt_or_prompts, (list, tuple)):
            prompts = list(prompt_or_prompts)
        else:
            raise UsageError(
                f"prompt_or_prompts must be a string or a list of strings (got {type(prompt_or_prompts).__name__})"
            )
        if not prompts:
            raise UsageError("no prompts given; pass a string or a non-empty list of strings")
        for p in prompts:
            if not isinstance(p, str):
                raise UsageError(f"prompts must be strings (got {type(p).__name__}); use generate_ids for token ids")
        o = self.options(**opts)
        gen = self._generation([self.encode(p) for p in prompts], o)
        texts = _TextRows(self, gen, o)
        with self._stepper_for(gen) as stepper, _runtime_errors(self):
            gen.stepper = stepper
            for nxt, took in gen:
                texts.update(nxt, took)
        result = gen.result()
        result.texts = texts.finish()
        return result

    def stream(self, prompt: str, cancel: threading.Event | None = None, **opts) -> TextStream:
        """Yield text pieces as they are decoded; whole characters only. ``.result`` is set at the end.

        ``cancel``: an Event (or anything with ``is_set()``) another thread may set to stop the generation;
        ``TextStream.cancel()`` sets it. It is checked after every token, so no further step runs once it is
        set; the result's finish reason is then ``"cancelled"``.
        """
        if not isinstance(prompt, str):
            raise UsageError(f"stream takes one prompt string (got {type(prompt).__name__}); use generate for a batch")
        if cancel is not None and not callable(getattr(cancel, "is_set", None)):
            raise UsageError(f"cancel must be a threading.Event (got {type(cancel).__name__})")
        o = self.options(**opts)
        gen = self._generation([self.encode(prompt)], o)
        return TextStream(self, gen, o, cancel)

    def generate_ids(self, ids_list, **opts) -> GenerationResult:
        """Token ids in (a list of rows, or one row), token ids out, with timings; for checks and benchmarks."""
        rows = _as_rows(ids_list)
        o = self.options(**opts)
        if o.stop:
            raise UsageError("stop strings apply to text; use generate or stream (or eos_token_id for token ids)")
        gen = self._generation(rows, o)
        with self._stepper_for(gen) as stepper, _runtime_errors(self):
            gen.stepper = stepper
            for _ in gen:
                pass
        return gen.result()

    # -- internals --------------------------------------------------------------------------
    def _generation(self, rows: list[list[int]], o: GenerationOptions) -> Generation:
        from .speculative import plan

        return plan(self, rows, o)

    def _stepper_for(self, gen: Generation) -> _Lease:
        return _Lease(self, gen.batch, gen.capacity)


class _Lease:
    """Borrow a KV stepper sized for (batch, capacity) from the model's pool; return it afterwards.

    Reusing buffers avoids faulting in fresh cache pages on every call; concurrent calls each get their own.
    """

    def __init__(self, model: Model, batch: int, capacity: int):
        self.model, self.batch, self.capacity = model, batch, capacity
        self.stepper: KVStepper | None = None

    def __enter__(self) -> KVStepper:
        m = self.model
        with m._lock:
            i = next((i for i, s in enumerate(m._pool) if s.batch == self.batch), None)
            if i is not None:  # one too small is dropped here, so its cache is freed before a larger one is made
                if m._pool[i].capacity >= self.capacity:
                    self.stepper = m._pool[i]
                del m._pool[i]
        if self.stepper is None:
            self.stepper = KVStepper(m.session, self.batch, self.capacity)
        self.stepper.run_seconds = 0.0
        return self.stepper

    def __exit__(self, *exc) -> None:
        m = self.model
        with m._lock:
            m._pool = [self.stepper, *[s for s in m._pool if s.batch != self.batch]][:2]


class _TextRows:
    """Per-row incremental detokenizer and stop matcher, driven by the generation loop."""

    def __init__(self, model: Model, gen: Generation, o: GenerationOptions):
        self.gen = gen
        self.eos = set(o.eos_ids)
        self.decoders = [IncrementalText(model.token_bytes) for _ in range(gen.batch)]
        self.stops = [StopMatcher(o.stop) for _ in range(gen.batch)]
        self.parts: list[list[str]] = [[] for _ in range(gen.batch)]
        self.closed = [False] * gen.batch

    def update(self, nxt: np.ndarray, took: np.ndarray) -> list[str]:
        """Consume one step; returns the new text per row ("" when nothing is ready)."""
        out = [""] * self.gen.batch
        for r in np.flatnonzero(took):
            r = int(r)
            tok = int(nxt[r])
            piece = "" if tok in self.eos else self.decoders[r].feed(tok)
            if not self.gen.active[r]:  # the row just finished: flush what is held back
                piece += self.decoders[r].flush()
            text, stopped = self.stops[r].feed(piece)
            if stopped:
                self.gen.finish(r, "stop")
            if not self.gen.active[r] and not self.closed[r]:
                text += self.stops[r].flush()
                self.closed[r] = True
            if text:
                self.parts[r].append(text)
                out[r] = text
        return out

    def close(self, r: int) -> str:
        """Flush row ``r`` if no step closed it (a cancelled generation); returns the text released."""
        if self.closed[r]:
            return ""
        self.closed[r] = True
        text, _ = self.stops[r].feed(self.decoders[r].flush())
        text += self.stops[r].flush()
        if text:
            self.parts[r].append(text)
        return text

    def finish(self) -> list[str]:
        return ["".join(p) for p in self.parts]


class TextStream:
    """Iterating yields text pieces; afterwards ``.result`` holds the GenerationResult (with ``texts``).

    ``cancel()`` may be called from any thread: the generation stops before its next step.
    """

    def __init__(self, model: Model, gen: Generation, o: GenerationOptions, cancel: threading.Event | None = None):
        self.model, self.gen, self.opts = model, gen, o
        self.result: GenerationResult | None = None
        self._cancel = cancel if cancel is not None else threading.Event()

    def cancel(self) -> None:
        """Stop the generation: no further token is computed; the finish reason becomes ``"cancelled"``."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[str]:
        gen = self.gen
        texts = _TextRows(self.model, gen, self.opts)
        with self.model._stepper_for(gen) as stepper, _runtime_errors(self.model):
            gen.stepper = stepper
            for nxt, took in gen:
                if self._cancel.is_set():  # set during this step: keep its token, flush, run no further step
                    gen.finish(0, "cancelled")
                piece = texts.update(nxt, took)[0]
                if piece:
                    yield piece
                if self._cancel.is_set():  # set while the caller handled the piece
                    gen.finish(0, "cancelled")
            tail = texts.close(0)  # what a cancel left held back (a stop-string prefix)
            if tail:
                yield tail
        self.result = gen.result()
        self.result.texts = texts.finish()

    @property
    def text(self) -> str | None:
        return None if self.result is None else self.result.texts[0]


@contextlib.contextmanager
def _runtime_errors(model: Model):
    """ONNX Runtime failing mid-generation (a graph the manifest misdescribes) as one GenerationError line."""
    try:
        yield
    except Exception as e:  # onnxruntime's own types, or the RuntimeError its IO-binding run raises
        if not (type(e).__module__.startswith("onnxruntime") or type(e) is RuntimeError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise GenerationError(
            f"ONNX Runtime failed running variant {model.variant} of {model.package.root}: {first}; "
            "run 'gpt2deploy verify' on the package or rebuild it"
        ) from None


def _as_rows(ids_list) -> list[list[int]]:
    if isinstance(ids_list, np.ndarray):
        ids_list = ids_list.tolist()
    if not isinstance(ids_list, (list, tuple)) or not ids_list:
        raise UsageError("generate_ids takes a non-empty list of token id lists")
    if all(isinstance(t, (int, np.integer)) for t in ids_list):
        ids_list = [ids_list]
    rows = []
    for r in ids_list:
        if isinstance(r, np.ndarray):
            r = r.tolist()
        if not isinstance(r, (list, tuple)) or not all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in r
        ):
            raise UsageError("generate_ids takes a list of lists of int token ids")
        rows.append([int(t) for t in r])
    return rows
