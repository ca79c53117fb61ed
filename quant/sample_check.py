"""Run a converted decoder graph on real tokens (prompt + one decode step): finite logits, agreement with fp32."""

from __future__ import annotations

import numpy as np

from .errors import QuantError
from .ort import failure, session


def run_logits(
    model_path, token_ids, n_layer: int, n_head: int, head_dim: int, providers=("CPUExecutionProvider",)
) -> list:
    """Logits of a prompt step and one decode step with past, through ONNX Runtime."""
    sess = session(model_path, providers)
    ids = np.asarray(token_ids, np.int64).reshape(1, -1)
    past_names = [f"past_key_values.{i}.{k}" for i in range(n_layer) for k in ("key", "value")]
    out_names = ["logits"] + [f"present.{i}.{k}" for i in range(n_layer) for k in ("key", "value")]
    prompt, last = ids[:, :-1], ids[:, -1:]
    feed = {
        "input_ids": prompt,
        "attention_mask": np.ones_like(prompt),
        "position_ids": np.arange(prompt.shape[1])[None],
    }
    feed.update({n: np.zeros((1, n_head, 0, head_dim), np.float32) for n in past_names})
    out = sess.run(out_names, feed)
    step = {
        "input_ids": last,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.array([[prompt.shape[1]]], np.int64),
    }
    step.update(zip(past_names, out[1:], strict=False))
    out2 = sess.run(out_names, step)
    return [out[0], out2[0]]


def check_finite(
    model_path, token_ids, n_layer: int, n_head: int, head_dim: int, providers=("CPUExecutionProvider",)
) -> dict:
    """Run the graph on ``token_ids`` (prompt + one decode step); raise QuantError on Inf/NaN logits."""
    if len(token_ids) < 2:
        raise QuantError("the finiteness check needs at least 2 tokens of text")
    try:
        logits = run_logits(model_path, token_ids, n_layer, n_head, head_dim, providers)
    except QuantError:
        raise
    except Exception as e:
        raise failure("the converted graph does not run", e, "check the onnxruntime version") from None
    bad = sum(int((~np.isfinite(x)).sum()) for x in logits)
    if bad:
        raise QuantError(
            f"the converted graph produced {bad} Inf/NaN logits on real text; keep more ops in float32 with --exclude"
        )
    return {"tokens": len(token_ids), "finite": True, "max_abs_logit": float(max(np.abs(x).max() for x in logits))}


def sample_check(model_path, reference_path, token_ids, n_layer: int, n_head: int, head_dim: int) -> dict:
    """``check_finite`` on CPU plus top-1 agreement and the largest logit difference against ``reference_path``."""
    result = check_finite(model_path, token_ids, n_layer, n_head, head_dim)
    ref = run_logits(reference_path, token_ids, n_layer, n_head, head_dim)
    new = run_logits(model_path, token_ids, n_layer, n_head, head_dim)
    agree = float(
        np.mean(np.concatenate([(a.argmax(-1) == b.argmax(-1)).ravel() for a, b in zip(ref, new, strict=True)]))
    )
    result.update(
        provider="CPUExecutionProvider",
        max_abs_logit_diff=float(max(np.abs(a - b).max() for a, b in zip(ref, new, strict=True))),
        top1_agreement=round(agree, 4),
    )
    return result
