"""One int8 table for the tied embedding and lm_head.

GPT-2 ties the lm_head to the token embedding ``wte`` [vocab, hidden]. Quantizing them separately
stores the largest matrix twice (or leaves the embedding in fp32: 4 bytes a weight). Here ``wte`` is
quantized once, symmetric int8 in blocks of ``block_size`` along the hidden axis, in the layout of an
8-bit ``MatMulNBits`` weight: B [vocab, n_blocks, block] (uint8, value + 128), scales [vocab * n_blocks].

* lm_head: ``MatMulNBits(x, B, scales, bits=8, accuracy_level=4)`` -- int8 activations per block,
  faster than ``DynamicQuantizeMatMul`` on the same bytes;
* embedding: row ``v`` of B is the quantized embedding row ``v``, so the lookup is a ``Gather`` of whole
  rows followed by the same dequantization (see ``tied_nbits``).

The rows layout matters for memory: ONNX Runtime replaces the lm_head's weight by a prepacked copy, and
when the graph is saved with ``quant.mapped.save_mapped`` the embedding lookup reads its own
memory-mapped alias of the same bytes, touching only the rows of the tokens it sees. The file carries
the matrix once (1 byte a weight) and the process holds one full copy (the prepacked one).
"""

from __future__ import annotations

import numpy as np

from .graph import consumers, ensure_opset, initializers, producers

#: Symmetric 8-bit MatMulNBits blocks along K: the tied table's layout, also int4's 8-bit head and int8
#: ``granularity="block"``.
INT8_BLOCK_SIZE = 128


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


def pow2_block(k: int, block_size: int) -> int:
    """``block_size``, or the smallest power of two >= 16 covering K when K is smaller."""
    b = 16
    while b < min(k, block_size):
        b *= 2
    return b


def quantize_blocks_int8(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per block of ``block_size`` along each row (K zero-padded to whole blocks).

    Returns ``(b, scales)``: b uint8 [N, n_blocks, block_size] holding ``q + 128``, scales [N * n_blocks].
    """
    n, k = w.shape
    nb = -(-k // block_size)
    padded = np.zeros((n, nb * block_size), np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, nb, block_size)
    amax = np.abs(blocks).max(axis=2)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None]), -127, 127).astype(np.int16)
    return (q + 128).astype(np.uint8), scale.reshape(-1)


def share_tied_int8(model, block_size: int = INT8_BLOCK_SIZE) -> tuple:
    """Rewrite the tied lm_head + embedding pair; return ``(model, info)`` (info["shared"] False if absent).

    Expects the fp32 graph before ``untie_lm_head``: ``MatMul(x, Transpose(W))`` and ``Gather(W, ids)``.
    """
    from onnx import helper, numpy_helper

    from .errors import QuantError
    from .tied_nbits import share_tied_nbits  # imports this module

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
    gathers = [
        n
        for n in uses.get(wname, [])
        if n.op_type == "Gather" and all(a.i == 0 for a in n.attribute if a.name == "axis")
    ]
    others = [n for n in uses.get(wname, []) if n is not tr and n not in gathers]
    if len(gathers) != 1 or others or _ids_rank(model, gathers[0].input[1]) is None:
        return model, {"shared": False, "reason": "the embedding is not a plain Gather on the lm_head weight"}
    if len(uses.get(tr.output[0], [])) != 1:
        return model, {"shared": False, "reason": "the transposed weight has other users"}
    if list(head.output) != ["logits"]:
        return model, {"shared": False, "reason": "the tied MatMul does not produce the logits"}

    w = numpy_helper.to_array(inits[wname]).astype(np.float32)
    vocab, hidden = w.shape
    bs = pow2_block(hidden, block_size)
    b, scale = quantize_blocks_int8(w, bs)
    bname, sname = f"{wname}_q8", f"{wname}_q8_scale"
    mm = helper.make_node(
        "MatMulNBits",
        [head.input[0], bname, sname],
        ["logits"],
        name=f"{head.name or 'lm_head'}_tied_q8",
        domain="com.microsoft",
        K=int(hidden),
        N=int(vocab),
        bits=8,
        block_size=int(bs),
        accuracy_level=4,
    )
    nodes = []
    for n in model.graph.node:
        if n is head:
            nodes.append(mm)
        elif n is not tr:
            nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend([numpy_helper.from_array(b, bname), numpy_helper.from_array(scale, sname)])
    ensure_opset(model, "com.microsoft", 1)
    model, emb = share_tied_nbits(model)  # the Gather now reads B's rows; the float table is dropped
    if not emb.get("shared"):
        raise QuantError(
            f"the tied embedding could not read the int8 lm_head table ({emb.get('reason')}); pass --exclude lm_head"
        )
    return model, {
        "shared": True,
        "weight": wname,
        "shape": [int(vocab), int(hidden)],
        "op": "MatMulNBits",
        "bits": 8,
        "block_size": int(bs),
        "granularity": f"per-block ({bs})",
        "max_abs_error": emb["max_abs_error"],
    }


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
        if (
            node.op_type != "Gather"
            or node.input[0] not in inits
            or any(a.i != 0 for a in node.attribute if a.name == "axis")
        ):
            continue
        t = inits[node.input[0]]
        if t.data_type != onnx.TensorProto.FLOAT or len(t.dims) != 2 or t.dims[0] < min_rows:
            continue
        if any(u is not node for u in uses.get(t.name, [])):
            continue  # shared with another op: leave it
        q, scale = quantize_row_int8(numpy_helper.to_array(t).astype(np.float32))
        p = f"{node.name or t.name}_int8"
        qname, sname, axes = f"{t.name}_int8", f"{t.name}_row_scale", f"{p}_axes"
        new_inits += [
            numpy_helper.from_array(q, qname),
            numpy_helper.from_array(scale, sname),
            numpy_helper.from_array(np.array([-1], np.int64), axes),
        ]
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
