"""FP16 for CUDA: mixed precision with float32 graph inputs/outputs.

Weights and most compute go to float16. Kept in float32: the graph I/O (``logits`` and the KV cache
keep the fp32 contract; Casts sit at the boundary), plain ``LayerNormalization`` and the ops of an
unfused layer norm / softmax whose reductions overflow or lose precision in half (``ReduceMean``,
``Pow``, ``Sqrt``, ``Softmax``), and the position/mask arithmetic. The fused ``SkipLayerNormalization``
accumulates in float32 internally, so it runs in half. The attention mask's large negative constants
are clamped to the float16 range.

On the CPU execution provider float16 is slower than float32 (most kernels upcast): this is a CUDA
variant. ``quant.sample_check.check_finite`` runs the converted graph (any provider) on real tokens to catch
Inf/NaN.
"""

from __future__ import annotations

from .exclude import resolve_exclude
from .ort import failure, quiet_ort_logging
from .report import PassResult, describe

#: Op types left in float32.
FP32_OPS = ("LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Softmax", "Range", "CumSum", "Where", "IsNaN")


def convert_fp16(model, keep_ops=FP32_OPS, exclude=()) -> tuple[object, PassResult]:
    """Return ``(model, result)`` with float16 weights and compute, fp32 I/O."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

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
        raise failure("FP16 conversion failed", e, "check the onnx/onnxruntime versions") from None
    desc = describe(fp16)
    details = {
        "mode": "fp16",
        "kept_fp32_ops": list(keep_ops),
        "excluded": blocked,
        "io": "float32",
        "fp16_matmuls": sum(1 for _ in desc["weight_matmuls"]["float_names"]),
        "float_weight_fraction": round(desc["weight_bytes"]["float_fraction"], 4),
        "weight_bytes": desc["weight_bytes"]["by_type"],
    }
    fraction = details["float_weight_fraction"]
    # every weight MatMul stays float (in half): none counts as quantized or skipped
    return fp16, PassResult("fp16", blocked, 0, 0, fraction, details=details)
