"""The graph toolkit every pass uses: load/save, index, match, attributes, opsets, initializers, node rewrites.

Reading: ``initializers``/``producers``/``consumers`` maps, ``GraphIndex`` (who produces or consumes a
tensor, constant values, ranks) for pattern matchers that return ``None`` on any mismatch, ``attr``/``attrs``.
Writing: ``replace_nodes``/``remove_nodes``/``insert_nodes`` edit the node list in place and in order (nodes
held by a matcher stay valid); ``add_initializers``/``remove_initializers``/``drop_unused_initializers``,
``rename_input``, ``ensure_opset``, ``remove_dead_nodes``, ``prune_value_info``. A pass plans its rewrite with
the index, then applies it here.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from .errors import QuantError

if TYPE_CHECKING:  # onnx is imported lazily at run time
    import onnx

#: Serialized protobufs are limited to 2 GiB; above this the weights go to an external ``.data`` file.
PROTOBUF_LIMIT = 2_000_000_000

ModelLike = Union["onnx.ModelProto", str, os.PathLike]

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")


def load(model: ModelLike):
    """A ModelProto from a path (external data included) or the ModelProto itself."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise QuantError(f"ONNX graph {path} does not exist; pass the path of a decoder graph")
    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as e:  # protobuf DecodeError, missing .data file...
        raise QuantError(f"cannot read ONNX graph {path} ({type(e).__name__}); re-export the model") from None


def initializers(model) -> dict:
    return {t.name: t for t in model.graph.initializer}


def producers(model) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def consumers(model) -> dict:
    out: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def opset(model, domain: str = "") -> int:
    for o in model.opset_import:
        if o.domain in (domain, "ai.onnx" if domain == "" else domain):
            return o.version
    return 0


def ensure_opset(model, domain: str, version: int) -> None:
    for o in model.opset_import:
        if o.domain == domain:
            o.version = max(o.version, version)
            return
    model.opset_import.add(domain=domain, version=version)


def check_decoder(model, n_layer: int | None = None) -> int:
    """Check the graph follows the decoder contract (Optimum names); return its layer count.

    Inputs ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value``;
    outputs ``logits``, ``present.{i}.key|value`` for every layer ``i``.
    """
    ins = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    outs = [o.name for o in model.graph.output]
    fix = "pass a decoder exported by 'gpt2deploy export' (Optimum I/O names)"
    missing = [n for n in ("input_ids", "attention_mask", "position_ids") if n not in ins]
    if missing or "logits" not in outs:
        what = ", ".join(missing + ([] if "logits" in outs else ["logits"]))
        raise QuantError(f"the graph is not a KV-cache decoder (missing {what}); {fix}")
    past = sorted({int(m.group(1)) for m in map(_PAST.match, ins) if m})
    present = sorted({int(m.group(1)) for m in map(_PRESENT.match, outs) if m})
    layers = n_layer if n_layer is not None else len(past)
    want = list(range(layers))
    if layers == 0 or past != want or present != want:
        raise QuantError(
            f"the graph's past/present tensors do not cover layers 0..{layers - 1} "
            f"(past layers {past[:4]}{'...' if len(past) > 4 else ''}, present layers "
            f"{present[:4]}{'...' if len(present) > 4 else ''}); {fix}"
        )
    for i in want:
        for kind in ("key", "value"):
            if f"past_key_values.{i}.{kind}" not in ins or f"present.{i}.{kind}" not in outs:
                raise QuantError(f"the graph lacks past_key_values.{i}.{kind} or present.{i}.{kind}; {fix}")
    extra = [n for n in ins if n not in ("input_ids", "attention_mask", "position_ids") and not _PAST.match(n)]
    if extra:
        raise QuantError(f"the graph has unexpected inputs ({', '.join(extra[:3])}); {fix}")
    return layers


def proto_size(model) -> int:
    """Bytes of all initializer data (inline or external) plus the rest of the graph, roughly."""
    return (
        sum(tensor_bytes(t) for t in model.graph.initializer)
        + model.graph.ByteSize()
        - sum(len(t.raw_data) for t in model.graph.initializer)
    )


def tensor_bytes(t) -> int:
    """Bytes of a tensor's data whether it is held as raw_data, typed fields or external data."""
    import onnx

    n = 1
    for d in t.dims:
        n *= d
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (n + 1) // 2
    return n * dtype.itemsize


def save(model, path: str | os.PathLike, external: bool | None = None) -> list[Path]:
    """Save ``model`` to ``path``; weights go to ``<name>.data`` beside it when the graph exceeds 2 GB.

    Returns the files written (graph first).
    """
    import onnx

    path = Path(path)
    if external is None:
        external = proto_size(model) > PROTOBUF_LIMIT
    if external:
        data = path.with_name(path.name + ".data")
        if data.exists():
            data.unlink()
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
        written = [path, data]
    else:
        onnx.save_model(model, str(path))
        written = [path]
    for p in written:  # onnx creates the data file owner-only; packages are read by other users and services
        os.chmod(p, 0o644)
    return written


class GraphIndex:
    """Read-only index of a graph: producers, consumers, constant values and ranks, without copying weights."""

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
        import onnx
        from onnx import numpy_helper

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
    """One attribute's value, or ``default`` when the node does not set it."""
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def attrs(node: onnx.NodeProto) -> dict:
    """Every attribute of ``node`` as ``{name: value}``."""
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def remove_dead_nodes(graph: onnx.GraphProto) -> int:
    """Drop nodes whose outputs reach no graph output; returns how many were removed."""
    needed = {vi.name for vi in graph.output}
    keep = [False] * len(graph.node)
    for i in range(len(graph.node) - 1, -1, -1):
        node = graph.node[i]
        if any(o in needed for o in node.output if o):
            keep[i] = True
            needed.update(x for x in node.input if x)
    dead = [n for n, k in zip(graph.node, keep, strict=True) if not k]
    if dead:
        remove_nodes(graph, dead)
        drop_unused_initializers(graph)
    return len(dead)


def replace_nodes(graph, changes: Iterable[tuple[onnx.NodeProto, Sequence[onnx.NodeProto]]]) -> None:
    """Put each ``(old, new_nodes)``'s new nodes where ``old`` was (an empty list removes it).

    Edits the node list in place: every node not replaced, and ``old`` itself when it is one of its
    ``new_nodes``, stays the same object, so references held by a matcher (or a ``GraphIndex``) remain
    valid. New nodes are copied into the graph.
    """
    plan = {id(old): list(new) for old, new in changes}
    if not plan:
        return
    nodes = graph.node
    for p in range(len(nodes) - 1, -1, -1):
        old = nodes[p]
        new = plan.get(id(old))
        if new is None:
            continue
        keep = next((k for k, n in enumerate(new) if n is old), None)
        if keep is None:
            del nodes[p]
            before, after = new, []
        else:
            before, after = new[:keep], new[keep + 1 :]
        for k, n in enumerate(after):
            nodes.insert(p + 1 + k, n)
        for k, n in enumerate(before):
            nodes.insert(p + k, n)


def remove_nodes(graph, nodes: Iterable[onnx.NodeProto]) -> None:
    replace_nodes(graph, ((n, ()) for n in nodes))


def insert_nodes(graph, new: Sequence[onnx.NodeProto], before: onnx.NodeProto | None = None) -> None:
    """Insert ``new`` in order just before ``before`` (at the start of the graph when None)."""
    if before is None:
        for k, n in enumerate(new):
            graph.node.insert(k, n)
    else:
        replace_nodes(graph, [(before, [*new, before])])


def rename_input(graph, old: str, new: str) -> None:
    """Every node reading tensor ``old`` reads ``new`` instead."""
    for node in graph.node:
        for k, x in enumerate(node.input):
            if x == old:
                node.input[k] = new


def add_initializers(graph, arrays: Mapping[str, np.ndarray]) -> None:
    """Add ``{name: array}`` as initializers."""
    from onnx import numpy_helper

    graph.initializer.extend(numpy_helper.from_array(np.asarray(v), name) for name, v in arrays.items())


def remove_initializers(graph, names: Iterable[str]) -> None:
    drop = set(names)
    keep = [t for t in graph.initializer if t.name not in drop]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def drop_unused_initializers(graph) -> None:
    """Remove initializers no node, graph input or graph output refers to."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output} | {i.name for i in graph.input}
    remove_initializers(graph, [t.name for t in graph.initializer if t.name not in used])


def prune_value_info(graph) -> None:
    """Drop value_info entries of tensors no node reads or writes any more."""
    live = {x for n in graph.node for x in (*n.input, *n.output)}
    keep = [vi for vi in graph.value_info if vi.name in live]
    if len(keep) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(keep)


def table_gathers(model) -> list[tuple[onnx.NodeProto, onnx.TensorProto]]:
    """``(node, table)`` for each ``Gather`` along axis 0 whose data is an initializer (embedding lookups)."""
    inits = initializers(model)
    return [
        (node, inits[node.input[0]])
        for node in model.graph.node
        if node.op_type == "Gather" and node.input[0] in inits and attr(node, "axis", 0) == 0
    ]


def ids_rank(model, name: str) -> int | None:
    """The rank of an index tensor (embedding ids): from value_info/inputs or a constant Reshape target."""
    for vi in list(model.graph.input) + list(model.graph.value_info):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    node = producers(model).get(name)
    inits = initializers(model)
    if node is not None and node.op_type == "Reshape" and node.input[1] in inits:
        return int(inits[node.input[1]].dims[0])
    return None
