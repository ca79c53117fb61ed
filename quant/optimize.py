"""Graph optimization before quantization: Gemm -> MatMul + Add, then ONNX Runtime's GPT-2 fusions.

``optimize(model, num_heads, hidden_size) -> (ModelProto, report)`` runs a list of steps, each
``step(model, num_heads, hidden_size) -> (model, info)``; a further fusion (attention) is one more entry
in ``STEPS`` after ``ort_fusions``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import QuantError
from .graph import ModelLike, add_initializers, attrs, consumers, ensure_opset, initializers, load, replace_nodes
from .ort import failure, quiet_ort_logging
from .report import op_counts

#: Contrib/fused ops worth reporting, in the order they are printed.
FUSED_OPS = (
    "SkipLayerNormalization",
    "LayerNormalization",
    "FastGelu",
    "BiasGelu",
    "Gelu",
    "Attention",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "RotaryEmbedding",
)


def gemm_to_matmul(model, num_heads: int = 0, hidden_size: int = 0, only_biasless: bool = False):
    """Rewrite ``Gemm(A, B, C)`` with a constant B as ``MatMul(A, B') [+ Add(C)]``.

    MatMulNBits only replaces MatMul, and ONNX Runtime's bias fusions (SkipLayerNormalization with
    bias, BiasGelu) look for MatMul + Add, so every weight Gemm becomes a MatMul. ``transB`` is folded
    into the weight, ``alpha``/``beta`` into weight and bias. Gemms with ``transA`` or a non-constant B
    are left alone (GPT-2 graphs have none). ``only_biasless`` rewrites just the Gemms without a bias
    (ONNX Runtime's GPT-2 post-processing assumes every Gemm has one).
    """
    import onnx
    from onnx import numpy_helper

    inits = initializers(model)
    uses = consumers(model)
    changes = []
    for node in model.graph.node:
        a = attrs(node)
        biasless = len(node.input) < 3 or node.input[2] == ""
        if node.op_type != "Gemm" or a.get("transA", 0) or node.input[1] not in inits:
            continue
        if only_biasless and not biasless:
            continue
        new_nodes = []
        wname = node.input[1]
        alpha = float(a.get("alpha", 1.0))
        if a.get("transB", 0) or alpha != 1.0:
            w = numpy_helper.to_array(inits[wname])
            w = np.ascontiguousarray((w.T if a.get("transB", 0) else w) * np.float32(alpha), dtype=np.float32)
            if len(uses.get(wname, [])) > 1:  # shared: keep the original for its other users
                wname = f"{wname}_matmul"
                add_initializers(model.graph, {wname: w})
            else:
                inits[wname].CopyFrom(numpy_helper.from_array(w, wname))
        has_bias = len(node.input) > 2 and node.input[2] != ""
        out = node.output[0]
        mm_out = f"{node.name or out}_matmul_out" if has_bias else out
        new_nodes.append(
            onnx.helper.make_node(
                "MatMul", [node.input[0], wname], [mm_out], name=f"{node.name}_MatMul" if node.name else ""
            )
        )
        if has_bias:
            bias = node.input[2]
            beta = float(a.get("beta", 1.0))
            if beta != 1.0:
                if bias not in inits:
                    raise QuantError(
                        f"Gemm {node.name} has a non-constant bias scaled by beta={beta}; re-export the model"
                    )
                b = numpy_helper.to_array(inits[bias]) * np.float32(beta)
                bias = f"{bias}_beta"
                add_initializers(model.graph, {bias: b.astype(np.float32)})
            new_nodes.append(
                onnx.helper.make_node("Add", [mm_out, bias], [out], name=f"{node.name}_Add" if node.name else "")
            )
        changes.append((node, new_nodes))
    replace_nodes(model.graph, changes)
    return model, {"gemm_rewritten": len(changes)}


def biasless_gemm_to_matmul(model, num_heads: int = 0, hidden_size: int = 0):
    """Gemms without a bias (exporters drop zero or absent biases) -> MatMul, before ORT's fusions."""
    return gemm_to_matmul(model, num_heads, hidden_size, only_biasless=True)


def ort_fusions(model, num_heads: int, hidden_size: int):
    """ONNX Runtime's transformer optimizer for GPT-2 (Python fusions only, opt_level 0, portable)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("gpt2")
    try:
        with quiet_ort_logging(("onnxruntime.transformers",), logging.ERROR, capture_output=True):
            opt = optimize_model(
                model,
                model_type="gpt2",
                num_heads=num_heads,
                hidden_size=hidden_size,
                optimization_options=options,
                opt_level=0,
                use_gpu=False,
            )
    except Exception as e:
        raise failure("onnxruntime's transformer optimizer failed", e, "check the onnxruntime version") from None
    stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    model = opt.model
    if any(n.domain == "com.microsoft" for n in model.graph.node):
        ensure_opset(model, "com.microsoft", 1)
    return model, {"ort_fused": stats}


def attention_fusion(model, num_heads: int, hidden_size: int, op: str = "GroupQueryAttention"):
    """Each layer's attention -> one contrib attention node, same graph I/O (``quant.attention``).

    GroupQueryAttention (the default) also makes the graph accept one in-place KV buffer per tensor
    (report ``kv_cache``: "shared"); MultiHeadAttention keeps past and present as separate tensors.
    """
    from .attention import fuse_attention

    return fuse_attention(model, num_heads, hidden_size, op=op)


Step = Callable[..., tuple]


@dataclass
class OptimizeReport:
    """What ``optimize`` did: op counts before/after, the fused contrib ops, each step's own info."""

    ops_before: dict
    ops_after: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)
    #: contrib/fused op -> count, in ``FUSED_OPS`` order (recorded in the manifest's recipe)
    fused: dict = field(default_factory=dict)
    #: "shared" when the graph accepts in-place KV buffers (see ``quant.attention``), else "concat"
    kv_cache: str = "concat"


#: The optimization pipeline, in order.
STEPS: list[tuple[str, Step]] = [
    ("biasless_gemm", biasless_gemm_to_matmul),
    ("ort_fusions", ort_fusions),
    ("attention", attention_fusion),
    ("gemm_to_matmul", gemm_to_matmul),
]


def optimize(
    model: ModelLike,
    num_heads: int,
    hidden_size: int,
    progress: Callable[[str], None] = lambda m: None,
    steps=None,
    fuse_attention: bool = True,
    attention_op: str = "GroupQueryAttention",
):
    """Run the optimization steps; return ``(model, OptimizeReport)``.

    ``fuse_attention=False`` skips the attention step; ``attention_op`` picks its contrib op
    (GroupQueryAttention or MultiHeadAttention).
    """
    if num_heads < 1 or hidden_size < 1 or hidden_size % num_heads:
        raise QuantError(
            f"hidden size {hidden_size} is not a multiple of {num_heads} heads; pass the model's n_head and n_embd"
        )
    model = load(model)
    report = OptimizeReport(ops_before=op_counts(model))
    for name, step in [s for s in (STEPS if steps is None else steps) if fuse_attention or s[0] != "attention"]:
        progress(f"optimize: {name}")
        model, info = (
            step(model, num_heads, hidden_size, op=attention_op)
            if name == "attention"
            else step(model, num_heads, hidden_size)
        )
        report.steps[name] = info
    report.ops_after = after = op_counts(model)
    report.fused = {op: after[op] for op in FUSED_OPS if after.get(op)}
    report.kv_cache = report.steps.get("attention", {}).get("kv_cache", "concat")
    return model, report
