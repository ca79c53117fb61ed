"""The decode loop's memory: a KV cache that never leaves ONNX Runtime's reach, fed through IO binding.

Variants whose manifest entry says ``kv_cache: "shared"`` (GroupQueryAttention graphs, see
``quant.attention``) get one preallocated buffer per cache tensor, [batch, heads, capacity, head_dim],
bound as both ``past`` and ``present``: the graph writes each step's keys and values in place and reads
the valid length from ``attention_mask``, so a step costs the same bindings whatever the context.

Other variants get two buffers per cache tensor (``present`` of step t is written into one, read back as
``past`` of step t+1 while the next ``present`` goes into the other), sized for the whole generation.
Every step binds pointers into them; no numpy copy of the cache, no allocation, no re-run of the prompt.
A tensor [batch, heads, n, head_dim] is the first batch*heads*n*head_dim elements of its buffer, so a
growing cache is always contiguous. On CUDA the buffers are device memory (OrtValues on 'cuda') and
only ids, mask and positions cross to the device each step; logits come back to host memory for sampling.
"""

from __future__ import annotations

import time

import numpy as np

from ..manifest import LOGITS_TO_KEEP
from .session import DecoderSession, positions_from_mask

#: Prompt positions per run of the prompt step (see ``KVStepper.prefill``).
PREFILL_CHUNK = 256

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class _Buffer:
    """A flat allocation on the session's device; ``ptr`` is its address."""

    def __init__(self, n: int, dtype, device: str, device_id: int = 0):
        if device == "cuda":
            import onnxruntime as ort

            self.value = ort.OrtValue.ortvalue_from_shape_and_type([max(n, 1)], dtype, "cuda", device_id)
            self.ptr = self.value.data_ptr()
        else:
            # zeros (lazily mapped, as cheap as empty): a padding column never holds NaN bits (0 x NaN is NaN)
            self.value = np.zeros(max(n, 1), dtype=dtype)
            self.ptr = self.value.ctypes.data


def _binders(io, device: str, device_id: int):
    """``bind_in/bind_out(name, 'cpu'|device, dtype, shape, ptr)`` for pre-allocated memory.

    ``IOBinding.bind_input/bind_output`` build an OrtDevice on every call; a decode step binds
    4 x n_layer tensors, so the device objects are made once here and the underlying binding is called
    directly. Any onnxruntime without that layout gets the public methods.
    """
    try:
        from onnxruntime.capi.onnxruntime_inference_collection import OrtDevice

        raw = io._iobinding
        devs = {d: OrtDevice.make(d, device_id if d != "cpu" else 0)._get_c_device() for d in {"cpu", device}}
        raw_in, raw_out = raw.bind_input, raw.bind_output

        def bind_in(name, dev, dtype, shape, ptr):
            raw_in(name, devs[dev], dtype, shape, ptr)

        def bind_out(name, dev, dtype, shape, ptr):
            raw_out(name, devs[dev], dtype, shape, ptr)

        probe = np.zeros((1, 1), dtype=np.int64)  # fails here, not mid-generation, if the layout differs
        bind_in("input_ids", "cpu", probe.dtype, [1, 1], probe.ctypes.data)
        return bind_in, bind_out
    except (ImportError, AttributeError, TypeError):

        def bind_in(name, dev, dtype, shape, ptr):
            io.bind_input(name, dev, device_id if dev != "cpu" else 0, dtype, shape, ptr)

        def bind_out(name, dev, dtype, shape, ptr):
            io.bind_output(name, dev, device_id if dev != "cpu" else 0, dtype, shape, ptr)

        return bind_in, bind_out


def regroupable(dec: DecoderSession) -> bool:
    """True when a stepper over ``dec`` can move, add and drop rows in place (an in-place cache on the CPU)."""
    return dec.kv_shared and dec.device == "cpu"


class KVStepper:
    """``prefill(ids, mask) -> last logits``, then ``step(tokens) -> logits`` once per new token.

    Logits returned by ``step`` are a view of a reused buffer: consume them before the next call.
    """

    def __init__(self, dec: DecoderSession, batch: int, capacity: int):
        self.dec = dec
        self.batch = batch
        self.slots = batch  # rows the buffers hold; ``regroup`` runs any first ``batch`` <= slots of them
        self.capacity = capacity
        d = dec.dims
        self.kv_shape = (batch, d.n_head, d.head_dim)
        inputs = {i.name: i.type for i in dec.session.get_inputs()}
        outputs = {o.name: o.type for o in dec.session.get_outputs()}
        self.kv_dtype = _DTYPES.get(inputs[dec.past_names[0]], np.float32)
        self.logits_dtype = _DTYPES.get(outputs["logits"], np.float32)
        self.device = dec.device
        self.device_id = 0
        per = batch * d.n_head * capacity * d.head_dim
        self.shared = dec.kv_shared
        self.sets = [
            [_Buffer(per, self.kv_dtype, self.device) for _ in dec.past_names] for _ in range(1 if self.shared else 2)
        ]
        self.ptrs = [[b.ptr for b in s] for s in self.sets]
        self.logits = np.empty((batch, 1, d.vocab_size), dtype=self.logits_dtype)
        self.mask = np.ones((batch, capacity), dtype=np.int64)
        self.ids = np.zeros((batch, 1), dtype=np.int64)
        self._one = np.ones(1, dtype=np.int64)  # logits_to_keep, when the graph takes it
        self.pos = np.zeros((batch, 1), dtype=np.int64)
        self.io = dec.session.io_binding()
        self.length = 0
        self.prefill_length = 0
        self.lengths: np.ndarray | None = None  # per row, when rows of different lengths share a step
        self.cur = 0
        self.run_seconds = 0.0  # time spent inside session.run for decode steps
        self._bind_in, self._bind_out = _binders(self.io, self.device, self.device_id)
        self._past = list(zip(dec.past_names, range(len(dec.past_names)), strict=False))
        self._present = list(zip(dec.present_names, range(len(dec.present_names)), strict=False))

    # -- binding helpers ------------------------------------------------------------------
    def _bind_host(self, name: str, arr: np.ndarray) -> None:
        self._bind_in(name, "cpu", arr.dtype, list(arr.shape), arr.ctypes.data)

    def _bind_shared(self) -> None:
        """past and present -> the same [batch, heads, capacity, head_dim] buffers (written in place)."""
        b, h, d = self.kv_shape
        shape = [b, h, self.capacity, d]
        dev, dt = self.device, self.kv_dtype
        for (name, i), (out, _) in zip(self._past, self._present, strict=False):
            self._bind_in(name, dev, dt, shape, self.ptrs[0][i])
            self._bind_out(out, dev, dt, shape, self.ptrs[0][i])

    def _bind_cache(self, length: int) -> None:
        """past <- set[cur][:length], present -> set[1 - cur][:length + new]."""
        b, h, d = self.kv_shape
        past_shape = [b, h, length, d]
        src, dst = self.ptrs[self.cur], self.ptrs[1 - self.cur]
        bind, dev, dt = self._bind_in, self.device, self.kv_dtype
        for name, i in self._past:
            bind(name, dev, dt, past_shape, src[i])
        return dst

    def _bind_present(self, dst, total: int) -> None:
        b, h, d = self.kv_shape
        shape = [b, h, total, d]
        bind, dev, dt = self._bind_out, self.device, self.kv_dtype
        for name, i in self._present:
            bind(name, dev, dt, shape, dst[i])

    # -- steps ----------------------------------------------------------------------------
    def prefill(self, ids: np.ndarray, mask: np.ndarray, chunk: int | None = None) -> np.ndarray:
        """Run the (left-padded) prompt into the cache; returns the last position's logits [batch, vocab].

        The prompt goes through in runs of at most ``chunk`` positions (default ``PREFILL_CHUNK``), each
        attending to the cache the previous ones wrote: the activations ONNX Runtime allocates for a run
        grow with its length, so a long prompt costs the memory of one chunk, not of the whole prompt.
        """
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        mask = np.ascontiguousarray(mask, dtype=np.int64)
        batch, seq = ids.shape
        if seq > self.capacity or batch != self.batch:
            raise ValueError("prompt does not fit the cache this stepper was sized for")
        chunk = PREFILL_CHUNK if chunk is None else chunk
        if chunk < 1:
            raise ValueError(f"prefill chunk must be >= 1 (got {chunk})")
        if batch > 1 and self.dec.single_row_chunks:
            chunk = seq  # GroupQueryAttention without per-row query lengths: multi-token steps with past are batch 1
        self.mask[:, :seq] = mask
        self.mask[:, seq:] = 1
        pos = positions_from_mask(mask)
        self.cur, self.length, self.lengths = 0, 0, None
        if self.shared:
            self._bind_shared()
        if self.dec.keeps_logits:  # only the last position is projected onto the vocabulary
            self._bind_host(LOGITS_TO_KEEP, self._one)
        for start in range(0, seq, chunk):
            end = min(seq, start + chunk)
            part = (
                np.ascontiguousarray(ids[:, start:end]),
                np.ascontiguousarray(mask[:, :end]),
                np.ascontiguousarray(pos[:, start:end]),
            )
            self._keep = part  # bound by pointer: alive until the run is done
            for name, arr in zip(("input_ids", "attention_mask", "position_ids"), part, strict=False):
                self._bind_host(name, arr)
            if not self.shared:
                self._bind_present(self._bind_cache(start), end)
            logits = (
                self.logits
                if self.dec.keeps_logits
                else np.empty((batch, end - start, self.logits.shape[-1]), self.logits_dtype)
            )
            self._bind_out("logits", "cpu", logits.dtype, list(logits.shape), logits.ctypes.data)
            self.dec.session.run_with_iobinding(self.io)
            if not self.shared:
                self.cur ^= 1
            self.length = end
        self.prefill_length = seq
        self.pos[:, 0] = pos[:, -1]
        last = logits[:, -1, :].astype(np.float32, copy=True)
        self._bind_out("logits", "cpu", self.logits.dtype, list(self.logits.shape), self.logits.ctypes.data)
        return last

    def keep_rows(self, rows) -> bool:
        """Shrink the batch to ``rows`` (indices into the current batch): their cache, mask and inputs move to
        new buffers and later steps compute those rows alone. Finished rows stop costing anything.

        CPU only; returns False (and changes nothing) on other devices, for an empty or unchanged selection.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if self.device != "cpu" or rows.size == 0 or rows.size == self.batch:
            return False
        b, h, d = self.kv_shape
        k, n, cap = rows.size, self.length, self.capacity
        sets = []
        for i, bufs in enumerate(self.sets):
            fresh = [_Buffer(k * h * cap * d, self.kv_dtype, "cpu") for _ in bufs]
            if self.shared or i == self.cur:  # the other set of a concat cache is written before it is read
                width = cap if self.shared else n  # a concat tensor is [b, h, n, d], a shared one [b, h, cap, d]
                for old, new in zip(bufs, fresh, strict=False):
                    src = old.value[: b * h * width * d].reshape(b, h, width, d)
                    new.value[: k * h * width * d].reshape(k, h, width, d)[:, :, :n] = src[rows, :, :n]
            sets.append(fresh)
        self.sets, self.ptrs = sets, [[x.ptr for x in bufs] for bufs in sets]
        self.batch, self.kv_shape = k, (k, h, d)
        self.mask, self.ids, self.pos = (np.ascontiguousarray(a[rows]) for a in (self.mask, self.ids, self.pos))
        self.logits = np.empty((k, 1, self.logits.shape[-1]), dtype=self.logits_dtype)
        self._bind_host("input_ids", self.ids)
        self._bind_host("position_ids", self.pos)
        self._bind_out("logits", "cpu", self.logits.dtype, list(self.logits.shape), self.logits.ctypes.data)
        if self.shared:
            self._bind_shared()
        return True

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row; returns logits [batch, vocab] (a reused buffer)."""
        if self.lengths is not None:
            return self._step_ragged(tokens)
        n = self.length
        if n >= self.capacity:
            raise ValueError("the KV cache is full")
        self.ids[:, 0] = tokens
        self.pos += 1
        mask = self.mask[:, : n + 1]
        if self.batch > 1:
            mask = np.ascontiguousarray(mask)
        self._mask_ref = mask
        if self.device != "cpu" or n == self.prefill_length:
            # Binding copies host inputs to a non-CPU device right away, so there they are bound again every
            # step; on the CPU the binding points at ids/pos, updated in place above.
            self._bind_host("input_ids", self.ids)
            self._bind_host("position_ids", self.pos)
        self._bind_host("attention_mask", mask)
        if not self.shared:
            self._bind_present(self._bind_cache(n), n + 1)
        t = time.perf_counter()
        self.dec.session.run_with_iobinding(self.io)
        self.run_seconds += time.perf_counter() - t
        if not self.shared:
            self.cur ^= 1
        self.length = n + 1
        logits = self.logits[:, 0, :]
        return logits if logits.dtype == np.float32 else logits.astype(np.float32)

    # -- hooks for rows that join a running batch (see ``batcher``) ----------------------------
    def read_kv(self) -> list[np.ndarray]:
        """The current cache per tensor as [batch, heads, width, head_dim] host arrays, width >= ``length``:
        views of the buffers on the CPU, copies elsewhere. Positions 0..length-1 are valid."""
        b, h, d = self.kv_shape
        width = self.capacity if self.shared else self.length
        out = []
        for buf in self.sets[self.cur]:
            flat = buf.value.numpy() if self.device == "cuda" else buf.value
            out.append(flat[: b * h * width * d].reshape(b, h, width, d))
        return out

    def kv_views(self, n: int) -> list[np.ndarray] | None:
        """CPU: writable [batch, heads, n, head_dim] views of the buffers ``resume`` reads (None elsewhere)."""
        if self.device != "cpu":
            return None
        b, h, d = self.kv_shape
        width = self.capacity if self.shared else n
        return [buf.value[: b * h * width * d].reshape(b, h, width, d)[:, :, :n] for buf in self.sets[0]]

    @property
    def regroupable(self) -> bool:
        """True when rows can be moved, added and dropped in place (an in-place cache on the CPU)."""
        return regroupable(self.dec)

    def slot_views(self) -> list[np.ndarray]:
        """In-place CPU cache: a writable [slots, heads, capacity, head_dim] view of every buffer. A row's slot
        is at the same address whatever the batch size, so rows can be rearranged here without reallocating."""
        if not self.regroupable:
            raise ValueError("only an in-place cache on the CPU has slots")
        _, h, d = self.kv_shape
        return [
            buf.value[: self.slots * h * self.capacity * d].reshape(self.slots, h, self.capacity, d)
            for buf in self.sets[0]
        ]

    def regroup(self, mask: np.ndarray, last_pos: np.ndarray) -> None:
        """In-place CPU cache: continue with the first ``mask.shape[0]`` slots, whose positions the caller has
        arranged in ``slot_views()`` (right-aligned to ``mask.shape[1]`` columns), ``mask`` [batch, width] and
        the last position per row. Nothing is allocated but the [batch, vocab] logits."""
        b = mask.shape[0]
        if not self.regroupable or not 1 <= b <= self.slots:
            raise ValueError("rows do not fit the slots of this cache")
        self._set_batch(b)
        self.resume(None, mask, last_pos)

    def _set_batch(self, b: int) -> None:
        """Batch-sized inputs and logits for ``b`` rows (bound by ``_rebind``); the KV buffers keep their slots."""
        if b == self.batch:
            return
        _, h, d = self.kv_shape
        self.batch, self.kv_shape = b, (b, h, d)
        self.mask = np.ones((b, self.capacity), dtype=np.int64)
        self.ids = np.zeros((b, 1), dtype=np.int64)
        self.pos = np.zeros((b, 1), dtype=np.int64)
        self.logits = np.empty((b, 1, self.logits.shape[-1]), dtype=self.logits_dtype)

    def _rebind(self, length: int) -> None:
        """After the rows changed: ``length`` positions held; inputs, caches and logits bound again."""
        self.cur, self.length, self.prefill_length = 0, length, length
        self._bind_host("input_ids", self.ids)
        self._bind_host("position_ids", self.pos)
        if self.shared:
            self._bind_shared()
        if self.dec.keeps_logits:
            self._bind_host(LOGITS_TO_KEEP, self._one)
        self._bind_out("logits", "cpu", self.logits.dtype, list(self.logits.shape), self.logits.ctypes.data)

    def regroup_ragged(self, lengths: np.ndarray) -> None:
        """In-place CPU cache of a ``ragged_rows`` graph: continue with the first ``len(lengths)`` slots, row i
        holding ``lengths[i]`` positions from column 0 (arranged by the caller in ``slot_views()``). Each step
        then feeds every row at its own position and attends to its own positions only: no row is padded to
        another's length, so the step reads each row's cache and nothing more."""
        lengths = np.asarray(lengths, dtype=np.int64)
        b = lengths.shape[0]
        if not self.regroupable or not self.dec.ragged_rows or not 1 <= b <= self.slots:
            raise ValueError("rows do not fit the slots of this cache, or its graph takes no ragged rows")
        if int(lengths.max()) >= self.capacity or int(lengths.min()) < 1:
            raise ValueError("row lengths must be within 1..capacity - 1")
        self._set_batch(b)
        self.lengths = lengths.copy()
        self._rebind(int(lengths.max()))

    def _step_ragged(self, tokens: np.ndarray) -> np.ndarray:
        lengths = self.lengths
        total = int(lengths.max()) + 1
        if total > self.capacity:
            raise ValueError("the KV cache is full")
        self.ids[:, 0] = tokens
        self.pos[:, 0] = lengths  # a row's new position follows its own
        # row i: its positions and the new one (columns 0..lengths[i]); GroupQueryAttention takes the row's
        # length from the mask's last 1 and writes the new position there
        mask = (np.arange(total, dtype=np.int64)[None, :] <= lengths[:, None]).astype(np.int64)
        self._mask_ref = mask
        self._bind_host("attention_mask", mask)
        t = time.perf_counter()
        self.dec.session.run_with_iobinding(self.io)
        self.run_seconds += time.perf_counter() - t
        lengths += 1
        self.length = total
        logits = self.logits[:, 0, :]
        return logits if logits.dtype == np.float32 else logits.astype(np.float32)

    def resume(self, kv: list[np.ndarray] | None, mask: np.ndarray, last_pos: np.ndarray) -> None:
        """Make this stepper continue rows whose cache is ``kv`` ([batch, heads, n, head_dim] per tensor;
        None: already written into ``kv_views(n)``), ``mask`` [batch, n] and last position per row: the next
        ``step`` feeds position ``last_pos + 1``."""
        b, h, d = self.kv_shape
        n = mask.shape[1]
        if mask.shape[0] != b or n > self.capacity:
            raise ValueError("rows do not fit the cache this stepper was sized for")
        width = self.capacity if self.shared else n
        for buf, arr in zip(self.sets[0], kv or [], strict=False):
            if self.device == "cuda":
                host = np.zeros(buf.value.shape()[0], dtype=self.kv_dtype)
                host[: b * h * width * d].reshape(b, h, width, d)[:, :, :n] = arr
                buf.value.update_inplace(host)
            else:
                buf.value[: b * h * width * d].reshape(b, h, width, d)[:, :, :n] = arr
        self.lengths = None
        self.mask[:, :n] = mask
        self.mask[:, n:] = 1
        self.pos[:, 0] = last_pos
        self._rebind(n)

    # -- multi-token steps with past and rollback (speculative decoding, see ``speculative``) ------------
    def extend(self, tokens: np.ndarray) -> np.ndarray:
        """Feed ``t`` tokens per row in one run (a multi-token step with past); returns logits [batch, t, vocab].

        In-place caches only. The positions they fill can be given back with ``truncate``.
        """
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        n, t = self.length, tokens.shape[1]
        if not self.shared or tokens.shape[0] != self.batch or self.lengths is not None:
            raise ValueError("multi-token steps need an in-place cache, rows of one length, one row of tokens each")
        if n + t > self.capacity:
            raise ValueError("the KV cache is full")
        pos = np.ascontiguousarray(self.pos + np.arange(1, t + 1, dtype=np.int64))
        mask = np.ascontiguousarray(self.mask[:, : n + t])
        keep = np.array([t], dtype=np.int64)
        logits = np.empty((self.batch, t, self.logits.shape[-1]), self.logits_dtype)
        self._keep = (tokens, pos, mask, keep, logits)  # bound by pointer: alive until the run is done
        for name, arr in zip(("input_ids", "position_ids", "attention_mask"), (tokens, pos, mask), strict=False):
            self._bind_host(name, arr)
        if self.dec.keeps_logits:
            self._bind_host(LOGITS_TO_KEEP, keep)
        self._bind_out("logits", "cpu", logits.dtype, list(logits.shape), logits.ctypes.data)
        t0 = time.perf_counter()
        self.dec.session.run_with_iobinding(self.io)
        self.run_seconds += time.perf_counter() - t0
        self.length = n + t
        self.pos[:, 0] = pos[:, -1]
        self._bind_host("input_ids", self.ids)  # back to the single-token step's bindings
        self._bind_host("position_ids", self.pos)
        if self.dec.keeps_logits:
            self._bind_host(LOGITS_TO_KEEP, self._one)
        self._bind_out("logits", "cpu", self.logits.dtype, list(self.logits.shape), self.logits.ctypes.data)
        return logits if logits.dtype == np.float32 else logits.astype(np.float32)

    def truncate(self, length: int) -> None:
        """Forget every cached position from ``length`` on (in-place caches: the next step overwrites them)."""
        if not self.shared or not self.prefill_length <= length <= self.length:
            raise ValueError("only an in-place cache can roll back, and not into the prompt")
        self.pos -= self.length - length
        self.length = length

    def cache(self) -> list[np.ndarray]:
        """The current cache as numpy arrays (a copy; for tests and inspection)."""
        b, h, d = self.kv_shape
        n = b * h * self.length * d
        out = []
        for buf in self.sets[self.cur]:
            flat = buf.value.numpy() if self.device == "cuda" else buf.value
            if self.shared:
                full = flat[: b * h * self.capacity * d].reshape(b, h, self.capacity, d)
                out.append(np.array(full[:, :, : self.length]))
            else:
                out.append(np.array(flat[:n]).reshape(b, h, self.length, d))
        return out
