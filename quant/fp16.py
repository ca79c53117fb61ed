"""FP16 for CUDA: mixed precision with float32 graph inputs/outputs.

Weights and most compute go to float16. Kept in float32: the graph I/O (``logits`` and the KV cache
keep the fp32 contract; Casts sit at the boundary), plain ``LayerNormalization`` and the ops of an
unfused layer norm / softmax whose reductions overflow or lose precision in half (``ReduceMean``,
``Pow``, ``Sqrt``, ``Softmax``), and the position/mask arithmetic. The fused ``SkipLayerNormalization``
accumulates in float32 internally, so it runs in half. The attention mask's large negative constants
are clamped to the float16 range.

On the CPU execution provider float16 is slower than float32 (most kernels upcast): this is a CUDA
variant. ``check_finite`` runs the converted graph (any provider) on real tokens to catch Inf/NaN.
"""

from __future__ import annotations

import numpy as np

from .errors import QuantError
from .report import describe

#: Op types left in float32.
FP32_OPS = ("LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Softmax", "Range", "CumSum", "Where", "IsNaN")


def convert_fp16(model, keep_ops=FP32_OPS, exclude=()):
    """Return ``(model, info)`` with float16 weights and compute, fp32 I/O."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from .exclude import resolve_exclude
    from .int8 import quiet_ort_logging

    node_names = {n.name for n in model.graph.node}
    blocked: list[str] = []
    for entry in (e.strip() for e in exclude):
        if entry:
            hits = [entry] if entry in node_names else resolve_exclude(model, [entry])
            blocked.extend(h for h in hits if h not in blocked)
    try:
        with quiet_ort_logging():
            fp16 = convert_float_to_float16(
                model,
                keep_io_types=True,
                op_block_list=list(keep_ops),
                node_block_list=blocked,
                disable_shape_infer=False,
            )
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise QuantError(
            f"FP16 conversion failed ({type(e).__name__}: {reason}); check the onnx/onnxruntime versions"
        ) from None
    desc = describe(fp16)
    info = {
        "mode": "fp16",
        "kept_fp32_ops": list(keep_ops),
        "excluded": blocked,
        "io": "float32",
        "fp16_matmuls": sum(1 for _ in desc["weight_matmuls"]["float_names"]),
        "float_weight_fraction": round(desc["weight_bytes"]["float_fraction"], 4),
        "weight_bytes": desc["weight_bytes"]["by_type"],
    }
    return fp16, info


def run_logits(
    model_path, token_ids, n_layer: int, n_head: int, head_dim: int, providers=("CPUExecutionProvider",)
) -> list:
    """Logits of a prompt step and one decode step with past, through ONNX Runtime."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), opts, providers=list(providers))
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
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise QuantError(
            f"the converted graph does not run ({type(e).__name__}: {reason}); check the onnxruntime version"
        ) from None
    bad = sum(int((~np.isfinite(x)).sum()) for x in logits)
    if bad:
        raise QuantError(
            f"the converted graph produced {bad} Inf/NaN logits on real text; keep more ops in float32 with --exclude"
        )
    return {"tokens": len(token_ids), "finite": True, "max_abs_logit": float(max(np.abs(x).max() for x in logits))}
