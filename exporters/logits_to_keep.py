"""An optional ``logits_to_keep`` input: project only the last N positions onto the vocabulary.

The vocabulary projection is the widest MatMul of GPT-2 (hidden x 50257). A prompt step that returns logits
for every position spends up to a third of its time there and materialises [batch, prompt, vocab] floats
(200 MB for a 1,000-token prompt at fp32) of which generation reads one row. The graph therefore takes
``logits_to_keep`` (int64 [1], the name and meaning of transformers' argument): the hidden states are
sliced to their last N positions before the projection, and ``logits`` is [batch, N, vocab]. 0 keeps every
position. The input is an initializer listed among the graph inputs (ONNX's way to give an input a default,
0), so callers following the plain Optimum contract never feed it and get every position, as before.
"""

from __future__ import annotations

import numpy as np

from .errors import ExportError

NAME = "logits_to_keep"
DEFAULT = 0
_HEAD_OPS = ("MatMul", "Gemm")


def add_logits_to_keep(model) -> bool:
    """Insert ``hidden[:, -logits_to_keep:]`` before the node that writes ``logits``; False if already there.

    ``model`` is an ``onnx.ModelProto`` (edited in place) whose ``logits`` come straight from the
    vocabulary projection of the [batch, sequence, hidden] states.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    if any(i.name == NAME for i in graph.input):
        return False
    head = next((n for n in graph.node if "logits" in n.output), None)
    if head is None or head.op_type not in _HEAD_OPS:
        found = "no node" if head is None else f"a {head.op_type} node"
        raise ExportError(
            f"the exported graph's logits come from {found}, not the vocabulary MatMul; check that the checkpoint is "
            "a GPT2LMHeadModel"
        )
    starts, ends, axes, kept = (f"{NAME}/{s}" for s in ("starts", "ends", "axes", "hidden"))
    graph.input.append(helper.make_tensor_value_info(NAME, TensorProto.INT64, [1]))
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([DEFAULT], np.int64), NAME),
            numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), ends),
            numpy_helper.from_array(np.array([1], np.int64), axes),
        ]
    )
    at = list(graph.node).index(head)
    graph.node.insert(at, helper.make_node("Slice", [head.input[0], starts, ends, axes], [kept], name=f"{NAME}/Slice"))
    graph.node.insert(at, helper.make_node("Neg", [NAME], [starts], name=f"{NAME}/Neg"))
    head.input[0] = kept
    return True
