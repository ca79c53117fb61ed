"""The oldest ONNX Runtime that loads and runs a graph, read from the graph itself.

ONNX Runtime checks each contrib op's input count against the schema of its own release, so a node written
with an input a later release added ("GroupQueryAttention ... has input size 17 not in range [min=7, max=16]")
makes the whole graph invalid on older runtimes. ``SCHEMA_MAX_INPUTS`` lists, per op, the highest input count
each release accepts (read from the load errors of each release's CPU wheel); ``requirement(model)`` takes the
highest release any node needs. Nothing is below ``FLOOR``, the oldest release the project supports and tests.

A contrib op, an ONNX opset or an IR version this table does not know is answered with the release that
wrote the graph (``writer``, the installed onnxruntime by default): true, if not the oldest.
"""

from __future__ import annotations

import onnx

from .versions import version_tuple

#: The oldest onnxruntime the project supports (pyproject's floor; tested in CI).
FLOOR = "1.22"
MS_DOMAIN = "com.microsoft"

#: op -> ((release, max inputs accepted), ...) in release order, from FLOOR on.
SCHEMA_MAX_INPUTS: dict[str, tuple[tuple[str, int], ...]] = {
    # 1.22: attention_bias (10); 1.23: head_sink (11); 1.25: 13-14; 1.28: 15-16; 1.32: query lengths (16)
    "GroupQueryAttention": (("1.22", 11), ("1.23", 12), ("1.25", 14), ("1.28", 16), ("1.32", 17)),
    "MultiHeadAttention": (("1.22", 10),),
    "MatMulNBits": (("1.22", 6),),
    "GatherBlockQuantized": (("1.22", 4),),
    "SkipLayerNormalization": (("1.22", 5),),
    "SkipSimplifiedLayerNormalization": (("1.22", 4),),
    "FastGelu": (("1.22", 2),),
    "BiasGelu": (("1.22", 2),),
    "Gelu": (("1.22", 1),),
    "QuickGelu": (("1.22", 1),),
    "DynamicQuantizeMatMul": (("1.22", 5),),
    "MatMulIntegerToFloat": (("1.22", 8),),
    "DynamicQuantizeLSTM": (("1.22", 12),),
    "Attention": (("1.22", 7),),
    "RotaryEmbedding": (("1.22", 4),),
    "SimplifiedLayerNormalization": (("1.22", 2),),
}
#: Default-domain opsets and IR versions every release from FLOOR on reads.
MAX_OPSET = 21
MAX_IR_VERSION = 10


def _short(v: str) -> str:
    return ".".join(str(x) for x in version_tuple(v)[:2])


def _installed() -> str:
    import onnxruntime

    return _short(onnxruntime.__version__)


def node_requirement(op: str, domain: str, n_inputs: int, writer: str) -> tuple[str, str]:
    """(release, why) for one node. Trailing empty inputs are already dropped from ``n_inputs``."""
    if domain in ("", "ai.onnx"):
        return FLOOR, ""
    table = SCHEMA_MAX_INPUTS.get(op) if domain == MS_DOMAIN else None
    if table is None:
        return writer, f"{domain}.{op} is not in the requirement table; the release that wrote it"
    for release, most in table:
        if n_inputs <= most:
            return release, f"{op} with {n_inputs} inputs"
    return writer, f"{op} with {n_inputs} inputs is beyond the requirement table; the release that wrote it"


def requirement(model: onnx.ModelProto, writer: str | None = None) -> dict:
    """{"onnxruntime": "1.xx", "why": "..."}: the oldest release (>= FLOOR) that loads and runs ``model``."""
    writer = _short(writer) if writer else _installed()
    need, why = FLOOR, f"the supported floor ({FLOOR})"
    for node in model.graph.node:
        count = len(node.input)
        while count and not node.input[count - 1]:
            count -= 1
        release, reason = node_requirement(node.op_type, node.domain, count, writer)
        if version_tuple(release) > version_tuple(need):
            need, why = release, reason
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > MAX_OPSET and version_tuple(writer) > version_tuple(need):
            need, why = writer, f"ONNX opset {imp.version}; the release that wrote it"
    if model.ir_version > MAX_IR_VERSION and version_tuple(writer) > version_tuple(need):
        need, why = writer, f"IR version {model.ir_version}; the release that wrote it"
    return {"onnxruntime": need, "why": why}


def contrib_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Contrib op -> largest input count used, for reports."""
    out: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            count = len(node.input)
            while count and not node.input[count - 1]:
                count -= 1
            out[node.op_type] = max(out.get(node.op_type, 0), count)
    return out
