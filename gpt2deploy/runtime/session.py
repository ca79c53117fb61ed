"""One decoder graph in an ONNX Runtime session: a plain forward over numpy arrays.

This is the simple, allocation-per-call path used by accuracy checks and tests. Generation uses the
faster loop in ``generate.py`` on top of the same session.
"""

from __future__ import annotations

import numpy as np

from ..bounds import check_threads
from ..compat import version_tuple
from ..errors import PackageError, UsageError
from ..manifest import LOGITS_TO_KEEP, past_name, present_name
from ..package import Package
from ..schema import Variant
from .memory import advise_mapped_weights, trim_heap
from .providers import providers_for, resolve_device


class DecoderSession:
    """``DecoderSession(package, variant, device, threads).forward(ids, mask, pos, past) -> (logits, present)``."""

    def __init__(
        self, package: Package, variant: str | Variant = "fp32", device: str = "cpu", threads: int | None = None
    ):
        import onnxruntime as ort

        threads = check_threads(threads)
        spec = variant if isinstance(variant, Variant) else package.variant_spec(variant)
        self.package = package
        self.spec = spec
        self.variant = spec.name
        self.device = resolve_device(device)
        self.dims = package.dims
        path = spec.graph  # validated: inside the package and among the variant's hashed files
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 4  # failures surface as exceptions, turned into one error line each
        self.session = ort.InferenceSession(str(path), opts, providers=providers_for(self.device))
        self.memory = self._settle_memory(path)
        d = self.dims
        self.past_names = [past_name(i, k) for i in range(d.n_layer) for k in ("key", "value")]
        self.present_names = [present_name(i, k) for i in range(d.n_layer) for k in ("key", "value")]
        self.output_names = ["logits", *self.present_names]
        self._check_graph(spec.file)
        self.kv_shared = spec.kv_shared
        self.ragged_rows = spec.ragged_rows  # rows of different lengths in one decode step (see ``batcher``)
        #: GroupQueryAttention in the portable (1.22) input schema runs a multi-token step with past for batch 1
        #: only; graphs written with per-row query lengths (onnxruntime >= 1.32) run it for any batch.
        need = spec.requires.get("onnxruntime") or "0"
        self.single_row_chunks = self.kv_shared and version_tuple(need) < (1, 32)
        #: The graph projects only the last N positions when fed ``logits_to_keep`` (see exporters.logits_to_keep).
        self.keeps_logits = LOGITS_TO_KEEP in spec.optional_inputs

    def _check_graph(self, rel: str) -> None:
        """The graph's inputs and outputs against the manifest's dims (layers, heads, head dim, vocabulary)."""
        d = self.dims
        have = {a.name: a.shape for a in self.session.get_inputs()}
        outputs = {a.name: a.shape for a in self.session.get_outputs()}
        want = ["input_ids", "attention_mask", "position_ids", *self.past_names]
        missing = [n for n in want if n not in have]
        extra = sorted(n for n in have if n.startswith("past_key_values.") and n not in self.past_names)
        why = None
        if missing or extra:
            n = (missing or extra)[0]
            why = f"{'lacks' if missing else 'has'} input {n}, which model.n_layer {d.n_layer} does not imply"
        elif "logits" not in outputs or any(n not in outputs for n in self.present_names):
            why = "lacks the logits or present outputs the manifest's model dims imply"
        else:
            past = have[self.past_names[0]] if self.past_names else None
            logits = outputs["logits"]
            if past and len(past) == 4 and isinstance(past[1], int) and past[1] != d.n_head:
                why = f"has {past[1]} heads in its KV cache, model.n_head says {d.n_head}"
            elif past and len(past) == 4 and isinstance(past[3], int) and past[3] != d.head_dim:
                why = f"has head size {past[3]} in its KV cache, model.head_dim says {d.head_dim}"
            elif logits and isinstance(logits[-1], int) and logits[-1] != d.vocab_size:
                why = f"has {logits[-1]} logits per position, model.vocab_size says {d.vocab_size}"
        if why:
            raise PackageError(
                f"variant {self.variant}'s graph {rel} {why}; the manifest does not describe this graph, "
                "run 'gpt2deploy verify' or rebuild the package"
            )

    def _settle_memory(self, graph_path) -> dict:
        """After the load on the CPU: sparse mapped weights and a trimmed heap (see ``memory``)."""
        if self.device != "cpu":
            return {"mappings": 0, "mapped_bytes": 0, "files": [], "heap_trimmed": False}
        report = advise_mapped_weights(self.spec.data_files)
        report["heap_trimmed"] = trim_heap()
        return report

    def empty_past(self, batch: int) -> list[np.ndarray]:
        d = self.dims
        return [np.zeros((batch, d.n_head, 0, d.head_dim), np.float32) for _ in self.past_names]

    def forward(self, input_ids, attention_mask=None, position_ids=None, past=None, logits_to_keep: int = 0):
        """Run one step. ``position_ids`` default to the attention mask's cumulative sum (left padding safe).

        ``logits_to_keep`` N > 0 returns logits for the last N positions only (computed for those alone when
        the graph takes the input, sliced here otherwise); 0 returns every position.
        """
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        past = self.empty_past(batch) if past is None else past
        past_len = past[0].shape[2]
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + seq), np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, -seq:]
        feed = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": np.asarray(position_ids, np.int64),
        }
        if logits_to_keep < 0:
            raise UsageError(f"logits_to_keep must be >= 0 (got {logits_to_keep}); 0 keeps every position")
        if logits_to_keep and self.keeps_logits:
            feed[LOGITS_TO_KEEP] = np.array([logits_to_keep], np.int64)
        if self.kv_shared and self.device == "cpu":
            logits, present = self._forward_in_place(feed, past, seq)
        else:
            feed.update(zip(self.past_names, past, strict=False))
            out = self.session.run(self.output_names, feed)
            logits, present = out[0], out[1:]
        if logits_to_keep and logits.shape[1] > logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return logits, present

    def _forward_in_place(self, feed: dict, past: list, seq: int):
        """The step as generation runs it on ``kv_cache: "shared"`` variants: each past copied into a buffer
        with room for the new positions, bound as both past and present, written in place by the graph."""
        import onnxruntime as ort

        io = self.session.io_binding()
        buffers, values = [], []  # the OrtValues wrap the buffers' memory: both stay alive until the run ends
        for name, arr in feed.items():  # OrtValues: bind_cpu_input cannot bind an input that has a default
            values.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr)))
            io.bind_ortvalue_input(name, values[-1])
        b, h, n, d = past[0].shape
        for p_name, o_name, arr in zip(self.past_names, self.present_names, past, strict=False):
            buf = np.empty((b, h, n + seq, d), dtype=arr.dtype)
            buf[:, :, :n] = arr
            buffers.append(buf)
            values.append(ort.OrtValue.ortvalue_from_numpy(buf))
            io.bind_ortvalue_input(p_name, values[-1])
            io.bind_ortvalue_output(o_name, values[-1])
        io.bind_output("logits")
        self.session.run_with_iobinding(io)
        return io.get_outputs()[-1].numpy(), buffers


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Position ids for left-padded rows: 0 for pads, then 0, 1, 2, ... over real tokens."""
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 0
    return pos.astype(np.int64)
