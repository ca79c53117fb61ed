"""Small read-only index over an ONNX graph for pattern matching, plus dead-node removal.

``GraphIndex`` answers "who produces this tensor", "who consumes it" and "is it a constant, and what is
its value" without copying weights. Matchers walk the graph through it and return ``None`` on any
mismatch, so a rewrite is only planned once a whole pattern is known to be present.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper


class GraphIndex:
    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = {vi.name for vi in graph.input}
        self.graph_outputs = {vi.name for vi in graph.output}
        self._values: dict[str, np.ndarray | None] = {}
        self._ranks = {}
        for vi in (*graph.value_info, *graph.input, *graph.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                self._ranks[vi.name] = len(vi.type.tensor_type.shape.dim)

    def rank(self, name: str) -> int | None:
        """The rank recorded for ``name`` in the graph's value_info/inputs/outputs, if any."""
        if name in self._ranks:
            return self._ranks[name]
        v = self.value(name)
        return None if v is None else v.ndim

    def parent(
        self, node: onnx.NodeProto, index: int, op_type: str | tuple[str, ...] | None = None
    ) -> onnx.NodeProto | None:
        """The node producing ``node.input[index]`` (optionally required to be of ``op_type``)."""
        if index >= len(node.input) or not node.input[index]:
            return None
        found = self.producer.get(node.input[index])
        if found is None:
            return None
        if op_type is not None:
            types = (op_type,) if isinstance(op_type, str) else op_type
            if found.op_type not in types or found.domain not in ("", "ai.onnx"):
                return None
        return found

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        """The single consumer of ``name`` when it has exactly one and is not a graph output."""
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.graph_outputs:
            return None
        return users[0]

    def value(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer or Constant node), else None."""
        if name in self._values:
            return self._values[name]
        found = None
        if name in self.initializers:
            found = numpy_helper.to_array(self.initializers[name])
        else:
            node = self.producer.get(name)
            if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value":
                        found = numpy_helper.to_array(attr.t)
                    elif attr.name in ("value_float", "value_int"):
                        found = np.asarray(onnx.helper.get_attribute_value(attr))
                    elif attr.name in ("value_floats", "value_ints"):
                        found = np.asarray(list(onnx.helper.get_attribute_value(attr)))
        self._values[name] = found
        return found

    def scalar(self, name: str) -> float | None:
        """A constant holding exactly one number, as a Python float."""
        v = self.value(name)
        if v is None or v.size != 1 or v.dtype.kind not in "fiu":
            return None
        return float(v.reshape(()))


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def remove_dead_nodes(graph: onnx.GraphProto) -> int:
    """Drop nodes whose outputs reach no graph output; returns how many were removed."""
    needed = {vi.name for vi in graph.output}
    keep = [False] * len(graph.node)
    for i in range(len(graph.node) - 1, -1, -1):
        node = graph.node[i]
        if any(o in needed for o in node.output if o):
            keep[i] = True
            needed.update(x for x in node.input if x)
    kept = [n for n, k in zip(graph.node, keep, strict=False) if k]
    removed = len(graph.node) - len(kept)
    if removed:
        del graph.node[:]
        graph.node.extend(kept)
        used = {x for n in kept for x in n.input}
        inputs = {vi.name for vi in graph.input}
        inits = [t for t in graph.initializer if t.name in used or t.name in needed or t.name in inputs]
        if len(inits) != len(graph.initializer):
            del graph.initializer[:]
            graph.initializer.extend(inits)
    return removed
