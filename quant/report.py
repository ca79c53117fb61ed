"""What a graph holds (op counts, weight bytes by precision, quantized vs float weight MatMuls) and what a
quantization pass did (``PassResult``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .graph import initializers, producers, tensor_bytes

#: Ops that multiply by a quantized weight.
QUANTIZED_MATMUL_OPS = (
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QLinearMatMul",
    "MatMulNBits",
    "QGemm",
)
FLOAT_MATMUL_OPS = ("MatMul", "Gemm", "FusedMatMul")
#: Element types that count as float weights.
_FLOAT_TYPES = ("float", "float16", "bfloat16", "double")


def op_counts(model) -> dict:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items(), key=lambda kv: (-kv[1], kv[0])))


def weight_source(model, name: str, inits: dict | None = None, prods: dict | None = None):
    """The initializer a MatMul operand comes from, following Transpose/Cast/Identity/DequantizeLinear."""
    inits = initializers(model) if inits is None else inits
    prods = producers(model) if prods is None else prods
    seen = 0
    while name not in inits and seen < 4:
        node = prods.get(name)
        if node is None or node.op_type not in ("Transpose", "Cast", "Identity"):
            return None
        name = node.input[0]
        seen += 1
    return inits.get(name)


def weight_matmuls(model) -> dict:
    """Classify weight multiplications: {"quantized": [names], "float": [names]}.

    A float MatMul/Gemm counts when its B operand is a constant weight (directly or through a
    Transpose/Cast); activation x activation MatMuls (attention scores) are not weight MatMuls.
    """
    inits, prods = initializers(model), producers(model)
    quantized, floating = [], []
    for n in model.graph.node:
        if n.op_type in QUANTIZED_MATMUL_OPS:
            quantized.append(n.name)
        elif n.op_type in FLOAT_MATMUL_OPS and len(n.input) > 1:
            w = weight_source(model, n.input[1], inits, prods)
            if w is not None and len(w.dims) == 2:
                floating.append(n.name)
    return {"quantized": quantized, "float": floating}


def weight_bytes(model) -> dict:
    """Initializer bytes by element type name, plus the float fraction."""
    import onnx

    by_type: Counter = Counter()
    for t in model.graph.initializer:
        by_type[onnx.TensorProto.DataType.Name(t.data_type).lower()] += tensor_bytes(t)
    total = sum(by_type.values())
    floating = sum(v for k, v in by_type.items() if k in _FLOAT_TYPES)
    return {
        "by_type": dict(by_type),
        "total": total,
        "float": floating,
        "float_fraction": (floating / total) if total else 0.0,
    }


def matmul_weight_bytes(model) -> dict:
    """Bytes of the weights feeding weight multiplications (quantized data + scales/zero points, or float)."""
    inits, prods = initializers(model), producers(model)
    quant, floating = 0, 0
    seen: set[str] = set()
    for n in model.graph.node:
        if n.op_type in QUANTIZED_MATMUL_OPS:
            for name in n.input[1:]:
                if name in inits and name not in seen:
                    seen.add(name)
                    quant += tensor_bytes(inits[name])
        elif n.op_type in FLOAT_MATMUL_OPS and len(n.input) > 1:
            w = weight_source(model, n.input[1], inits, prods)
            if w is not None and len(w.dims) == 2 and w.name not in seen:
                seen.add(w.name)
                floating += tensor_bytes(w)
    return {"quantized": quant, "float": floating, "total": quant + floating}


def describe(model) -> dict:
    """A plain summary used by the passes and the CLI."""
    mm = weight_matmuls(model)
    wb = weight_bytes(model)
    return {
        "ops": op_counts(model),
        "weight_matmuls": {"quantized": len(mm["quantized"]), "float": len(mm["float"]), "float_names": mm["float"]},
        "weight_bytes": wb,
        "matmul_weight_bytes": matmul_weight_bytes(model),
    }


@dataclass
class HeadResult:
    """How a pass stored the lm_head."""

    bits: int
    block_size: int | None
    symmetric: bool
    #: the embedding lookup reads the lm_head's quantized table (the tied matrix is stored once)
    shared_with_embedding: bool


@dataclass
class PassResult:
    """What a quantization pass did; ``details`` is the plain JSON a package records (``recipe.details``)."""

    mode: str
    excluded: list[str]
    quantized_matmuls: int
    skipped_matmuls: int
    float_weight_fraction: float
    head: HeadResult | None = None
    #: int8 only: the CPU has VNNI (None when unknown), and whether weights were quantized to 7 bits
    cpu_vnni: bool | None = None
    reduce_range: bool = False
    details: dict = field(default_factory=dict)


def pass_result(mode: str, model, excluded: list[str], details: dict, **typed) -> PassResult:
    """A ``PassResult`` whose counts come from ``describe(model)``; they are added to ``details`` too."""
    desc = describe(model)
    counts = {
        "excluded": excluded,
        "quantized_matmuls": desc["weight_matmuls"]["quantized"],
        "skipped_matmuls": desc["weight_matmuls"]["float"],
        "float_weight_fraction": round(desc["weight_bytes"]["float_fraction"], 4),
    }
    return PassResult(mode=mode, **counts, **typed, details={"mode": mode, **details, **counts})
