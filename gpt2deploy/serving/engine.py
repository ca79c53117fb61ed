"""The serving engine: one loaded model, one decode-loop thread, continuous batching over ``runtime.batcher``.

Requests are split into sequences (one per prompt and choice) that wait in a bounded queue; at every step
boundary the loop lets waiting sequences into the batch (up to ``max_batch``), drops cancelled ones and runs
one batched step. Results go back to each request's ``Handle`` as events, thread-safely, on the asyncio loop
the handle was made for.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass

from ..errors import Gpt2DeployError, UsageError
from ..runtime.batcher import Batcher, Emit, Row, TokenLogprob
from .metrics import Metrics

#: Prompt positions run per decode step for a row that is joining (bounds the others' inter-token latency).
PREFILL_CHUNK = 64


class QueueFull(Exception):
    """More sequences are waiting than ``max_queue`` allows."""


class NotAccepting(Exception):
    """The engine is not running (still loading, or shutting down)."""


@dataclass
class Sequence:
    """One prompt x choice of a request, as submitted: prompt ids (fitted to the context) and options."""

    ids: list[int]
    opts: object  # GenerationOptions
    logprobs: int | None = None
    prompt_logprobs: bool = False  # echo with logprobs: score the prompt tokens too
    truncated: int = 0  # prompt tokens dropped from the start to fit the context
    score_only: bool = False  # echo with max_tokens 0: the prompt's log-probabilities, nothing generated


class Handle:
    """A request's sequences in the engine. Events arrive on ``events`` (an asyncio.Queue):
    ``("prompt", index, [TokenLogprob])``, ``("token", index, Emit)``, ``("error", index, message)``."""

    def __init__(self, seqs: list[Sequence], loop: asyncio.AbstractEventLoop | None):
        self.seqs = seqs
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.t_submit = time.perf_counter()
        self.rows: list[Row | None] = [None] * len(seqs)
        self.open = len(seqs)  # sequences not yet finished
        self._last: list[float | None] = [None] * len(seqs)
        self._engine: Engine | None = None

    def cancel(self) -> None:
        """The client went away: every sequence of this request leaves the batch at the next step boundary."""
        if not self.cancelled:
            self.cancelled = True
            if self._engine is not None:
                self._engine._wake()

    def _put(self, event) -> None:
        if self.loop is None:
            self.events.put_nowait(event)
        else:
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass


class Engine:
    """``Engine(model, max_batch=8, max_queue=64)``; ``start()``, ``submit(seqs)``, ``stop(timeout)``.

    ``Engine.from_package(path, variant=..., device=..., threads=...)`` loads the package first.
    """

    def __init__(
        self,
        model,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        model_id: str | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
    ):
        if max_batch < 1:
            raise UsageError(f"max_batch must be >= 1 (got {max_batch})")
        if max_queue < 0:
            raise UsageError(f"max_queue must be >= 0 (got {max_queue})")
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.model_id = model_id or model.package.root.name
        self.metrics = Metrics()
        self.batcher = Batcher(model.session, model.token_bytes, prefill_chunk, max_rows=max_batch)
        self._pending: collections.deque = collections.deque()  # (handle, index)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stopping = False
        self._deadline: float | None = None
        self.ready = threading.Event()

    @classmethod
    def from_package(
        cls,
        path,
        *,
        variant=None,
        device="auto",
        threads=None,
        verify=True,
        max_batch=8,
        max_queue=64,
        model_id=None,
        prefill_chunk=PREFILL_CHUNK,
    ) -> Engine:
        import warnings

        from ..runtime.model import load

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load(path, variant=variant, device=device, threads=threads, verify=verify)
        return cls(model, max_batch=max_batch, max_queue=max_queue, model_id=model_id, prefill_chunk=prefill_chunk)

    # -- facts for the API ----------------------------------------------------------------------
    @property
    def context(self) -> int:
        return self.model.dims.n_positions

    @property
    def vocab(self) -> int:
        return self.model.dims.vocab_size

    def describe(self) -> dict:
        m = self.model
        return {
            "id": self.model_id,
            "object": "model",
            "created": int(m.package.root.stat().st_mtime),
            "owned_by": "gpt2deploy",
            "variant": m.variant,
            "device": m.device,
            "context_length": m.dims.n_positions,
            "max_batch": self.max_batch,
        }

    def sequence(
        self, prompt, options: dict, logprobs: int | None = None, prompt_logprobs: bool = False, score_only=False
    ) -> Sequence:
        """Tokenize and fit one prompt; raises the runtime's errors (GenerationError, UsageError) when it
        does not fit the context or an option is invalid."""
        ids = self.model.encode(prompt) if isinstance(prompt, str) else list(prompt)
        opts = self.model.options(**options)
        ids, dropped, opts = self.batcher.fit(ids, opts)
        return Sequence(ids, opts, logprobs, prompt_logprobs, dropped, score_only)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> Engine:
        with self._cond:
            if self._thread is not None:
                return self
            self._accepting, self._stopping, self._deadline = True, False, None
            self._thread = threading.Thread(target=self._run, name="gpt2deploy-decode", daemon=True)
            self._thread.start()
        self.ready.set()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def drain(self, timeout: float) -> None:
        """Stop accepting; sequences in flight (and waiting) may finish until ``timeout`` seconds from now,
        then every one left is cancelled."""
        with self._cond:
            self._accepting = False
            self.ready.clear()
            if self._deadline is None:
                self._deadline = time.monotonic() + max(0.0, timeout)
            self._stopping = True
            self._cond.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        """``drain(timeout)`` and wait for the decode loop to end (cancelling what is left at the deadline)."""
        self.drain(timeout)
        t = self._thread
        if t is not None:
            t.join(timeout + 5.0)
        self._thread = None

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- requests -----------------------------------------------------------------------------------
    def submit(self, seqs: list[Sequence], loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Queue a request's sequences; raises QueueFull or NotAccepting instead of waiting."""
        handle = Handle(seqs, loop)
        handle._engine = self
        with self._cond:
            if not self._accepting:
                raise NotAccepting("the server is not accepting requests (loading or shutting down)")
            room = self.max_batch - self.batcher.size
            if len(self._pending) + len(seqs) > self.max_queue + max(0, room):
                raise QueueFull(f"{len(self._pending)} sequences are already waiting (limit {self.max_queue})")
            self._pending.extend((handle, i) for i in range(len(seqs)))
            self.metrics.loop_state(len(self._pending), self.metrics.batch_size)
            self._cond.notify_all()
        return handle

    # -- the decode loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        b = self.batcher
        while True:
            with self._cond:
                while not self._pending and b.size == 0 and not self._stopping:
                    self._cond.wait(0.5)
                if self._stopping and (not self._pending and b.size == 0):
                    break
                late = self._stopping and self._deadline is not None and time.monotonic() >= self._deadline
                admit = []
                if late:
                    admit = list(self._pending)
                    self._pending.clear()
                else:
                    while self._pending and b.size + len(admit) < self.max_batch:
                        admit.append(self._pending.popleft())
            steps, rows, prompt_s, decode_s = b.decode_steps, b.decode_rows, b.prompt_seconds, b.decode_seconds
            try:
                cancelled = self._iteration(admit, late)
            except Exception as e:  # a failing run must not leave requests hanging
                self._fail_all(f"generation failed: {_one_line(e)}")
                cancelled = 0
            with self._cond:
                self.metrics.loop_state(
                    len(self._pending),
                    b.size,
                    b.decode_steps - steps,
                    cancelled,
                    b.decode_rows - rows,
                    b.prompt_seconds - prompt_s,
                    b.decode_seconds - decode_s,
                )
        with self._cond:
            self.metrics.loop_state(0, 0)

    def _iteration(self, admit: list, late: bool) -> int:
        """Cancel what must go, admit what may come, run one step; returns the sequences cancelled."""
        b = self.batcher
        cancelled = 0
        for row in b.live():
            if not row.done and (late or row.key[0].cancelled):
                self._deliver(b.cancel(row))
                cancelled += 1
        for handle, i in admit:
            if late or handle.cancelled:
                self._finish_unstarted(handle, i)
                cancelled += 1
            else:
                self._admit(handle, i)
        for e in b.step():
            self._deliver(e)
        return cancelled

    def _admit(self, handle: Handle, i: int) -> None:
        seq = handle.seqs[i]
        row = Row(list(seq.ids), seq.opts, logprobs=seq.logprobs, key=(handle, i))
        row.truncated = seq.truncated
        handle.rows[i] = row
        try:
            if seq.prompt_logprobs:
                handle._put(("prompt", i, self.batcher.prompt_logprobs(row.ids, seq.logprobs or 0)))
            if seq.score_only:
                row.reason = "length"
                self.metrics.tokens(prompt=len(row.ids))
                self._deliver(Emit(row, -1, "", finish="length"))
                return
            self.batcher.add(row)
        except Gpt2DeployError as e:
            handle._put(("error", i, str(e)))
            handle.open -= 1
            return
        except Exception as e:
            handle._put(("error", i, f"generation failed: {_one_line(e)}"))
            handle.open -= 1
            return
        self.metrics.tokens(prompt=len(row.ids))

    def _finish_unstarted(self, handle: Handle, i: int) -> None:
        row = Row(list(handle.seqs[i].ids), handle.seqs[i].opts, key=(handle, i), reason="cancelled")
        handle.rows[i] = row
        self._deliver(Emit(row, -1, "", finish="cancelled"))

    def _deliver(self, emit: Emit | None) -> None:
        if emit is None:
            return
        handle, i = emit.row.key
        now = time.perf_counter()
        if emit.token >= 0:
            self.metrics.tokens(completion=1)
            last = handle._last[i]
            if last is None:
                self.metrics.observe_ttft(now - handle.t_submit)
            else:
                self.metrics.observe_itl(now - last)
            handle._last[i] = now
        if emit.finish is not None:
            handle.open -= 1
        handle._put(("token", i, emit))

    def _fail_all(self, message: str) -> None:
        b = self.batcher
        for row in b.live():
            if not row.done:
                row.reason = "error"
                handle, i = row.key
                handle.open -= 1
                handle._put(("error", i, message))
        b.reset()


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


__all__ = ["Engine", "Handle", "NotAccepting", "QueueFull", "Sequence", "TokenLogprob"]
