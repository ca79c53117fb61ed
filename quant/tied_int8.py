"""One int8 table for the tied embedding and lm_head.

GPT-2 ties the lm_head to the token embedding ``wte`` [vocab, hidden]. Quantizing them separately
stores the largest matrix twice (or leaves the embedding in fp32: 4 bytes a weight). Here ``wte`` is
quantized once, symmetric int8 with one scale per vocabulary row, and stored transposed as
``Wq`` [hidden, vocab]:

* lm_head: ``DynamicQuantizeMatMul(x, Wq, scale[vocab], 0)`` -- per-output-column scales;
* embedding: ``Gather(Wq, ids, axis=1)`` -> [hidden, *ids] -> Cast -> Transpose -> ``* scale[ids]``.

Per-row scales are the natural granularity for both uses, so this is more accurate than a
per-tensor table and the file carries the matrix once (1 byte a weight).
"""
from __future__ import annotations

import numpy as np

from .graph import consumers, ensure_opset, initializers, producers


def _ids_rank(model, name: str) -> int | None:
    for vi in list(model.graph.input) + list(model.graph.value_info):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    node = producers(model).get(name)
    inits = initializers(model)
    if node is not None and node.op_type == "Reshape" and node.input[1] in inits:
        return int(inits[node.input[1]].dims[0])
    return None


def quantize_row_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: ``w ~= q * scale[:, None]``."""
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def share_tied_int8(model) -> tuple:
    """Rewrite the tied lm_head + embedding pair; return ``(model, info)`` (info["shared"] False if absent).

    Expects the fp32 graph before ``untie_lm_head``: ``MatMul(x, Transpose(W))`` and ``Gather(W, ids)``.
    """
    import onnx
    from onnx import helper, numpy_helper

    inits, prods, uses = initializers(model), producers(model), consumers(model)
    head = tr = None
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        t = prods.get(node.input[1])
        if t is not None and t.op_type == "Transpose" and t.input[0] in inits and len(inits[t.input[0]].dims) == 2:
            perm = [list(a.ints) for a in t.attribute if a.name == "perm"]
            if not perm or perm[0] == [1, 0]:
                head, tr = node, t
                break
    if head is None:
        return model, {"shared": False, "reason": "no MatMul over a transposed embedding"}
    wname = tr.input[0]
    gathers = [n for n in uses.get(wname, []) if n.op_type == "Gather" and all(a.i == 0 for a in n.attribute if a.name == "axis")]
    others = [n for n in uses.get(wname, []) if n is not tr and n not in gathers]
    if not gathers or others or any(_ids_rank(model, g.input[1]) is None for g in gathers):
        return model, {"shared": False, "reason": "the embedding is not a plain Gather on the lm_head weight"}
    if len(uses.get(tr.output[0], [])) != 1:
        return model, {"shared": False, "reason": "the transposed weight has other users"}

    w = numpy_helper.to_array(inits[wname]).astype(np.float32)
    vocab, hidden = w.shape
    q, scale = quantize_row_int8(w)
    qname, sname, zname = f"{wname}_int8_t", f"{wname}_row_scale", f"{wname}_row_zero_point"
    new_inits = [
        numpy_helper.from_array(np.ascontiguousarray(q.T), qname),
        numpy_helper.from_array(scale, sname),
        numpy_helper.from_array(np.zeros(vocab, np.int8), zname),
    ]
    replace: dict[int, list] = {}
    replace[id(head)] = [
        helper.make_node(
            "DynamicQuantizeMatMul", [head.input[0], qname, sname, zname], list(head.output), name=f"{head.name}_tied_int8", domain="com.microsoft"
        )
    ]
    replace[id(tr)] = []
    for k, g in enumerate(gathers):
        rank = _ids_rank(model, g.input[1])
        p = f"{g.name or 'embedding'}_tied{k}"
        axes = f"{p}_axes"
        new_inits.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
        perm = list(range(1, rank + 1)) + [0]
        replace[id(g)] = [
            helper.make_node("Gather", [qname, g.input[1]], [f"{p}_q"], name=f"{p}_gather", axis=1),
            helper.make_node("Cast", [f"{p}_q"], [f"{p}_f"], name=f"{p}_cast", to=onnx.TensorProto.FLOAT),
            helper.make_node("Transpose", [f"{p}_f"], [f"{p}_t"], name=f"{p}_transpose", perm=perm),
            helper.make_node("Gather", [sname, g.input[1]], [f"{p}_s"], name=f"{p}_scale", axis=0),
            helper.make_node("Unsqueeze", [f"{p}_s", axes], [f"{p}_su"], name=f"{p}_unsqueeze"),
            helper.make_node("Mul", [f"{p}_t", f"{p}_su"], list(g.output), name=f"{p}_dequantize"),
        ]
    nodes = []
    for n in model.graph.node:
        nodes.extend(replace.get(id(n), [n]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    keep = [t for t in model.graph.initializer if t.name != wname]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + new_inits)
    ensure_opset(model, "com.microsoft", 1)
    err = float(np.abs(q.astype(np.float32) * scale[:, None] - w).max())
    return model, {"shared": True, "weight": wname, "shape": [int(vocab), int(hidden)], "granularity": "per-row", "max_abs_error": err}


def int8_embedding(model, min_rows: int = 1024) -> tuple:
    """Store each float token-embedding Gather table as int8 with one scale per row.

    ``Gather(W, ids)`` -> ``Gather(Wq, ids) -> Cast -> * scale[ids]``. Used where the lm_head has its own
    quantized copy (INT4): the embedding then costs 1 byte a weight instead of 4, and per-row int8 is
    far more accurate than 4-bit blocks for a lookup table. Tables with fewer than ``min_rows`` rows
    (the position embedding) stay float.
    """
    import onnx
    from onnx import helper, numpy_helper

    inits, uses = initializers(model), consumers(model)
    replace: dict[int, list] = {}
    new_inits, dropped, done = [], set(), []
    for node in model.graph.node:
        if node.op_type != "Gather" or node.input[0] not in inits or any(a.i != 0 for a in node.attribute if a.name == "axis"):
            continue
        t = inits[node.input[0]]
        if t.data_type != onnx.TensorProto.FLOAT or len(t.dims) != 2 or t.dims[0] < min_rows:
            continue
        if any(u is not node for u in uses.get(t.name, [])):
            continue  # shared with another op: leave it
        q, scale = quantize_row_int8(numpy_helper.to_array(t).astype(np.float32))
        p = f"{node.name or t.name}_int8"
        qname, sname, axes = f"{t.name}_int8", f"{t.name}_row_scale", f"{p}_axes"
        new_inits += [numpy_helper.from_array(q, qname), numpy_helper.from_array(scale, sname), numpy_helper.from_array(np.array([-1], np.int64), axes)]
        replace[id(node)] = [
            helper.make_node("Gather", [qname, node.input[1]], [f"{p}_q"], name=f"{p}_gather", axis=0),
            helper.make_node("Cast", [f"{p}_q"], [f"{p}_f"], name=f"{p}_cast", to=onnx.TensorProto.FLOAT),
            helper.make_node("Gather", [sname, node.input[1]], [f"{p}_s"], name=f"{p}_scale", axis=0),
            helper.make_node("Unsqueeze", [f"{p}_s", axes], [f"{p}_su"], name=f"{p}_unsqueeze"),
            helper.make_node("Mul", [f"{p}_f", f"{p}_su"], list(node.output), name=f"{p}_dequantize"),
        ]
        dropped.add(t.name)
        done.append({"weight": t.name, "shape": [int(x) for x in t.dims]})
    if not done:
        return model, {"int8_embedding": []}
    nodes = []
    for n in model.graph.node:
        nodes.extend(replace.get(id(n), [n]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    keep = [t for t in model.graph.initializer if t.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + new_inits)
    return model, {"int8_embedding": done}
