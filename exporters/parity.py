"""Parity of an exported graph with the PyTorch checkpoint on real text.

Three checks, all on tokenized English prompts:
- prompt step (past length 0), all positions and, when the graph takes ``logits_to_keep``, the last alone;
- several greedy decode steps feeding ``present`` back as ``past``;
- a batch of two prompts of different lengths with left padding (prompt step and decode steps).
Max abs logit difference must stay within ``atol`` and greedy tokens must be identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ParityError
from .logits_to_keep import NAME as LOGITS_TO_KEEP
from .onnx_export import CachedLM, input_names

DEFAULT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog because it",
    "In Python, a list is",
)
DEFAULT_ATOL = 1e-4


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def _positions(mask: np.ndarray, new: int) -> np.ndarray:
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 0
    return pos[:, -new:].astype(np.int64)


class _Runner:
    def __init__(self, model, onnx_path: Path, threads: int | None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.torch_fn = CachedLM(model)
        cfg = model.config
        self.n_layer, self.n_head, self.head_dim = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
        self.names = input_names(self.n_layer)
        self.keeps_logits = LOGITS_TO_KEEP in {i.name for i in self.sess.get_overridable_initializers()}

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.n_head, 0, self.head_dim), np.float32) for _ in range(2 * self.n_layer)]

    def last_logits(self, ids, mask, pos, past) -> np.ndarray:
        """The graph's logits with ``logits_to_keep`` = 1: the last position only."""
        feed = dict(zip(self.names, [ids, mask, pos, *past], strict=False))
        feed[LOGITS_TO_KEEP] = np.array([1], np.int64)
        return self.sess.run(["logits"], feed)[0]

    def step(self, ids, mask, pos, past):
        import torch

        feed = dict(zip(self.names, [ids, mask, pos, *past], strict=False))
        ort_out = self.sess.run(None, feed)
        with torch.no_grad():
            ref = self.torch_fn(
                torch.from_numpy(ids),
                torch.from_numpy(mask),
                torch.from_numpy(pos),
                [torch.from_numpy(p) for p in past],
            )
        ref = [t.numpy() for t in ref]
        return ort_out, ref


def _diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    d = np.abs(a - b)
    if mask is not None:  # only positions holding real tokens
        d = d[mask.astype(bool)]
    return float(d.max()) if d.size else 0.0


def _run_sequence(r: _Runner, rows: list[list[int]], pad_id: int, steps: int) -> dict:
    ids, mask = _left_pad(rows, pad_id)
    pos = _positions(mask, ids.shape[1])
    ort_out, ref = r.step(ids, mask, pos, r.empty_past(len(rows)))
    prompt_diff = _diff(ort_out[0], ref[0], mask)
    if r.keeps_logits:  # the prompt step as generation runs it: the last position's logits alone
        last = r.last_logits(ids, mask, pos, r.empty_past(len(rows)))
        prompt_diff = max(prompt_diff, _diff(last, ref[0][:, -1:]) if last.shape[1] == 1 else float("inf"))
    seq_mask = mask.astype(bool)[:, None, :, None]  # pad positions hold don't-care values
    present_diff = max(
        float(np.abs(a - b)[np.broadcast_to(seq_mask, a.shape)].max())
        for a, b in zip(ort_out[1:], ref[1:], strict=False)
    )
    decode_diff = 0.0
    ort_tokens, ref_tokens = [], []
    past_ort, past_ref = ort_out[1:], [x.copy() for x in ref[1:]]
    next_ort = ort_out[0][:, -1].argmax(-1)
    next_ref = ref[0][:, -1].argmax(-1)
    for _ in range(steps):
        ort_tokens.append(next_ort.tolist())
        ref_tokens.append(next_ref.tolist())
        mask = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], axis=1)
        pos = _positions(mask, 1)
        # Both sides are fed the reference's token so a single divergence cannot cascade.
        step_ids = next_ref[:, None].astype(np.int64)
        o, _ = r.step(step_ids, mask, pos, past_ort)
        _, t = r.step(step_ids, mask, pos, past_ref)
        decode_diff = max(decode_diff, _diff(o[0], t[0]))
        past_ort, past_ref = o[1:], t[1:]
        next_ort, next_ref = o[0][:, -1].argmax(-1), t[0][:, -1].argmax(-1)
    return {
        "prompt_max_abs_diff": prompt_diff,
        "present_max_abs_diff": present_diff,
        "decode_max_abs_diff": decode_diff,
        "greedy_tokens_equal": ort_tokens == ref_tokens,
    }


def validate(
    model,
    onnx_path: str | Path,
    tokenizer_path: str | Path,
    prompts: tuple[str, str] = DEFAULT_PROMPTS,
    decode_steps: int = 8,
    atol: float = DEFAULT_ATOL,
    threads: int | None = None,
) -> dict:
    """Compare the ONNX graph with PyTorch. Returns the report; raises ParityError when out of tolerance."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    rows = [tok.encode(p).ids for p in prompts]
    rows = [r[: model.config.n_positions // 2] for r in rows]
    if len(rows[0]) == len(rows[1]):
        rows[1] = rows[1][:-1]
    pad_id = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    steps = max(1, min(decode_steps, model.config.n_positions // 2 - max(len(r) for r in rows)))
    runner = _Runner(model, Path(onnx_path), threads)
    single = _run_sequence(runner, rows[:1], pad_id, steps)
    batch = _run_sequence(runner, rows, pad_id, steps)
    worst = max(
        single["prompt_max_abs_diff"],
        single["decode_max_abs_diff"],
        batch["prompt_max_abs_diff"],
        batch["decode_max_abs_diff"],
    )
    report = {
        "atol": atol,
        "max_abs_diff": worst,
        "prompt_tokens": [len(r) for r in rows],
        "decode_steps": steps,
        "single": single,
        "batch_left_padded": batch,
        "passed": bool(worst <= atol and single["greedy_tokens_equal"] and batch["greedy_tokens_equal"]),
    }
    if not report["passed"]:
        raise ParityError(
            "exported graph disagrees with PyTorch: max abs logit diff "
            f"{worst:.3g} (prompt {single['prompt_max_abs_diff']:.3g}, decode {single['decode_max_abs_diff']:.3g}, "
            f"left-padded batch {batch['prompt_max_abs_diff']:.3g}/{batch['decode_max_abs_diff']:.3g}; tolerance "
            f"{atol:g}), "
            f"greedy tokens equal: {single['greedy_tokens_equal'] and batch['greedy_tokens_equal']}; "
            "report this checkpoint with the versions of torch, transformers and onnxruntime",
            report,
        )
    return report
