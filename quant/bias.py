"""Bias additions folded into the MatMul before them: one kernel instead of two per projection.

``MatMulNBits`` takes an optional bias (input 5, in every supported release). Each ``MatMulNBits`` whose only
consumer is an ``Add`` of a constant [N] vector gets that vector as its bias and the ``Add`` goes: the same
sums, one node dispatch and one pass over the output fewer per projection and step.
"""

from __future__ import annotations

import onnx

from .graph import GraphIndex, attr, remove_nodes

BIAS_INPUT = 5


def fold_matmul_bias(model: onnx.ModelProto) -> int:
    """Fold ``MatMulNBits -> Add(bias)`` pairs in place; returns how many were folded."""
    graph = model.graph
    index = GraphIndex(graph)
    dropped = []
    for node in graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) > BIAS_INPUT and node.input[BIAS_INPUT]:
            continue
        add = index.only_consumer(node.output[0])
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
            continue
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        bias = index.initializers.get(other)
        if bias is None or list(bias.dims) != [attr(node, "N")] or bias.data_type != onnx.TensorProto.FLOAT:
            continue
        inputs = list(node.input) + [""] * (BIAS_INPUT + 1 - len(node.input))
        inputs[BIAS_INPUT] = other
        del node.input[:]
        node.input.extend(inputs)
        node.output[0] = add.output[0]
        dropped.append(add)
    remove_nodes(graph, dropped)
    return len(dropped)
