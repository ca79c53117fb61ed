"""The tied embedding and lm_head stored once: graph rewrites (the numbers are in ``quant.blocks``).

GPT-2 ties the lm_head to the token embedding ``wte`` [vocab, hidden]. Quantizing them separately
stores the largest matrix twice (or leaves the embedding in fp32: 4 bytes a weight).

``share_tied_int8`` (the int8 variant): ``wte`` is quantized once, symmetric int8 in blocks of
``block_size`` along the hidden axis, in the layout of an 8-bit ``MatMulNBits`` weight:
B [vocab, n_blocks, block] (uint8, value + 128), scales [vocab * n_blocks].

* lm_head: ``MatMulNBits(x, B, scales, bits=8, accuracy_level=4)`` -- int8 activations per block,
  faster than ``DynamicQuantizeMatMul`` on the same bytes;
* embedding: row ``v`` of B is the quantized embedding row ``v``, so the lookup is a ``Gather`` of whole
  rows followed by the same dequantization (``share_tied_nbits``).

``share_tied_nbits`` (any MatMulNBits lm_head, 4 or 8 bits): ``MatMulNBits`` keeps the lm_head as
B [vocab, n_blocks, blob] (values in blocks along the hidden axis), scales [vocab, n_blocks] and zero
points. Row ``v`` of B is exactly the quantized embedding row ``v``, so ``Gather(wte, ids)`` becomes a
lookup into B with the same dequantization in plain ONNX ops (Gather, BitwiseAnd/BitShift to unpack
nibbles, Cast, Sub, Mul, Reshape). The fp32 table is dropped: one quantized copy in the file, read by both ops.

The rows layout matters for memory: ONNX Runtime replaces the lm_head's weight by a prepacked copy, and
when the graph is saved with ``quant.mapped.save_mapped`` the embedding lookup reads its own
memory-mapped alias of the same bytes, touching only the rows of the tokens it sees. The file carries
the matrix once (1 byte a weight) and the process holds one full copy (the prepacked one).

``int8_embedding`` stores a float embedding table on its own as int8 with one scale per row (where the
lm_head has its own quantized copy).
"""

from __future__ import annotations

import numpy as np

from .blocks import INT8_BLOCK_SIZE, dequantize_rows, pow2_block, quantize_blocks_int8, quantize_row_int8
from .errors import QuantError
from .graph import (
    add_initializers,
    attrs,
    consumers,
    ensure_opset,
    ids_rank,
    initializers,
    producers,
    remove_initializers,
    replace_nodes,
    table_gathers,
)


def share_tied_int8(model, block_size: int = INT8_BLOCK_SIZE) -> tuple:
    """Rewrite the tied lm_head + embedding pair; return ``(model, info)`` (info["shared"] False if absent).

    Expects the fp32 graph before ``untie_lm_head``: ``MatMul(x, Transpose(W))`` and ``Gather(W, ids)``.
    """
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
    gathers = [
        n
        for n in uses.get(wname, [])
        if n.op_type == "Gather" and all(a.i == 0 for a in n.attribute if a.name == "axis")
    ]
    others = [n for n in uses.get(wname, []) if n is not tr and n not in gathers]
    if len(gathers) != 1 or others or ids_rank(model, gathers[0].input[1]) is None:
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
    replace_nodes(model.graph, [(head, [mm]), (tr, [])])
    add_initializers(model.graph, {bname: b, sname: scale})
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


def share_tied_nbits(model) -> tuple:
    """Point the tied embedding Gather at the lm_head's MatMulNBits table; return ``(model, info)``."""
    import onnx
    from onnx import helper, numpy_helper

    inits, prods, uses = initializers(model), producers(model), consumers(model)
    head = prods.get("logits")
    if head is None or head.op_type != "MatMulNBits":
        return model, {"shared": False, "reason": "the logits do not come from a MatMulNBits lm_head"}
    a = attrs(head)
    k, n, bits, bs = a["K"], a["N"], a.get("bits", 4), a["block_size"]
    bname, sname = head.input[1], head.input[2]
    zname = head.input[3] if len(head.input) > 3 and head.input[3] else None
    if bname not in inits or sname not in inits or (zname and zname not in inits) or len(head.input) > 4:
        return model, {"shared": False, "reason": "the lm_head has no constant B/scales/zero points"}
    b = numpy_helper.to_array(inits[bname])
    scales = numpy_helper.to_array(inits[sname]).astype(np.float32)
    zp = numpy_helper.to_array(inits[zname]) if zname else None
    nb = b.shape[1]
    gathers = []
    for node, t in table_gathers(model):
        if (
            t.data_type == onnx.TensorProto.FLOAT
            and list(t.dims) == [n, k]
            and all(u is node for u in uses.get(t.name, []))
        ):
            gathers.append(node)
    if len(gathers) != 1:
        return model, {"shared": False, "reason": "no single float embedding Gather of the lm_head's shape"}
    gather = gathers[0]
    rank = ids_rank(model, gather.input[1])
    if rank is None:
        return model, {"shared": False, "reason": "the rank of the embedding indices is unknown"}
    w = numpy_helper.to_array(inits[gather.input[0]]).astype(np.float32)
    deq = dequantize_rows(b, scales, zp, bits, k)
    step = np.abs(scales).max()
    err = float(np.abs(deq - w).max())
    if err > step * (2**bits) / 2:  # not the same matrix (an untied head)
        return model, {"shared": False, "reason": "the lm_head is not tied to the embedding"}

    p = f"{gather.name or 'embedding'}_tied{bits}"
    keep = [0] * rank
    ids = gather.input[1]
    consts = {
        f"{p}_mask": np.array(0x0F, np.uint8),
        f"{p}_shift": np.array(4, np.uint8),
        f"{p}_last": np.array([-1], np.int64),
        f"{p}_shape_q": np.array(keep + [nb, -1], np.int64),
        f"{p}_shape_out": np.array(keep + [-1], np.int64),
        f"{p}_k": np.array([k], np.int64),
        f"{p}_zero": np.array([0], np.int64),
    }
    nodes = [helper.make_node("Gather", [bname, ids], [f"{p}_b"], name=f"{p}_gather_b", axis=0)]

    def unpack(src: str, dst: str) -> list:
        return [
            helper.make_node("BitwiseAnd", [src, f"{p}_mask"], [f"{dst}_lo"], name=f"{dst}_lo"),
            helper.make_node("BitShift", [src, f"{p}_shift"], [f"{dst}_hi"], name=f"{dst}_hi", direction="RIGHT"),
            helper.make_node("Unsqueeze", [f"{dst}_lo", f"{p}_last"], [f"{dst}_lo1"], name=f"{dst}_lo1"),
            helper.make_node("Unsqueeze", [f"{dst}_hi", f"{p}_last"], [f"{dst}_hi1"], name=f"{dst}_hi1"),
            helper.make_node("Concat", [f"{dst}_lo1", f"{dst}_hi1"], [f"{dst}_pairs"], name=f"{dst}_pairs", axis=-1),
        ]

    if bits == 4:
        nodes += unpack(f"{p}_b", f"{p}_qb")
        nodes.append(helper.make_node("Reshape", [f"{p}_qb_pairs", f"{p}_shape_q"], [f"{p}_q"], name=f"{p}_q"))
    else:
        nodes.append(helper.make_node("Identity", [f"{p}_b"], [f"{p}_q"], name=f"{p}_q"))
    nodes.append(helper.make_node("Cast", [f"{p}_q"], [f"{p}_qf"], name=f"{p}_qf", to=onnx.TensorProto.FLOAT))
    if zname:
        nodes.append(helper.make_node("Gather", [zname, ids], [f"{p}_z"], name=f"{p}_gather_z", axis=0))
        if bits == 4:
            consts[f"{p}_nb"] = np.array([nb], np.int64)
            nodes += unpack(f"{p}_z", f"{p}_zb")
            nodes += [
                helper.make_node("Reshape", [f"{p}_zb_pairs", f"{p}_shape_out"], [f"{p}_zall"], name=f"{p}_zall"),
                helper.make_node(
                    "Slice", [f"{p}_zall", f"{p}_zero", f"{p}_nb", f"{p}_last"], [f"{p}_zq"], name=f"{p}_zq"
                ),
            ]
        else:
            nodes.append(helper.make_node("Identity", [f"{p}_z"], [f"{p}_zq"], name=f"{p}_zq"))
        nodes += [
            helper.make_node("Cast", [f"{p}_zq"], [f"{p}_zf"], name=f"{p}_zf", to=onnx.TensorProto.FLOAT),
            helper.make_node("Unsqueeze", [f"{p}_zf", f"{p}_last"], [f"{p}_zu"], name=f"{p}_zu"),
        ]
        zero = f"{p}_zu"
    else:
        consts[f"{p}_zdefault"] = np.array(2 ** (bits - 1), np.float32)
        zero = f"{p}_zdefault"
    sname2 = sname
    if len(inits[sname].dims) == 1:  # scales stored flat: [N * n_blocks]
        consts[f"{p}_shape_s"] = np.array([n, nb], np.int64)
        nodes.append(helper.make_node("Reshape", [sname, f"{p}_shape_s"], [f"{p}_s2d"], name=f"{p}_s2d"))
        sname2 = f"{p}_s2d"
    nodes += [
        helper.make_node("Gather", [sname2, ids], [f"{p}_s"], name=f"{p}_gather_s", axis=0),
        helper.make_node("Unsqueeze", [f"{p}_s", f"{p}_last"], [f"{p}_su"], name=f"{p}_su"),
        helper.make_node("Sub", [f"{p}_qf", zero], [f"{p}_centered"], name=f"{p}_centered"),
        helper.make_node("Mul", [f"{p}_centered", f"{p}_su"], [f"{p}_deq"], name=f"{p}_deq"),
    ]
    out = gather.output[0]
    if nb * (b.shape[2] * (2 if bits == 4 else 1)) == k:
        nodes.append(helper.make_node("Reshape", [f"{p}_deq", f"{p}_shape_out"], [out], name=f"{p}_out"))
    else:  # K was padded to whole blocks
        nodes += [
            helper.make_node("Reshape", [f"{p}_deq", f"{p}_shape_out"], [f"{p}_padded"], name=f"{p}_padded"),
            helper.make_node("Slice", [f"{p}_padded", f"{p}_zero", f"{p}_k", f"{p}_last"], [out], name=f"{p}_out"),
        ]
    dropped = gather.input[0]
    replace_nodes(model.graph, [(gather, nodes)])
    remove_initializers(model.graph, [dropped])
    used = {i for node in nodes for i in node.input}
    add_initializers(model.graph, {name: v for name, v in consts.items() if name in used})
    return model, {"shared": True, "weight": dropped, "bits": int(bits), "block_size": int(bs), "max_abs_error": err}


def int8_embedding(model, min_rows: int = 1024) -> tuple:
    """Store each float token-embedding Gather table as int8 with one scale per row.

    ``Gather(W, ids)`` -> ``Gather(Wq, ids) -> Cast -> * scale[ids]``. Used where the lm_head has its own
    quantized copy (INT4): the embedding then costs 1 byte a weight instead of 4, and per-row int8 is
    far more accurate than 4-bit blocks for a lookup table. Tables with fewer than ``min_rows`` rows
    (the position embedding) stay float.
    """
    import onnx
    from onnx import helper, numpy_helper

    uses = consumers(model)
    replace: list[tuple] = []
    new_inits: dict[str, np.ndarray] = {}
    dropped, done = set(), []
    for node, t in table_gathers(model):
        if t.data_type != onnx.TensorProto.FLOAT or len(t.dims) != 2 or t.dims[0] < min_rows:
            continue
        if any(u is not node for u in uses.get(t.name, [])):
            continue  # shared with another op: leave it
        q, scale = quantize_row_int8(numpy_helper.to_array(t).astype(np.float32))
        p = f"{node.name or t.name}_int8"
        qname, sname, axes = f"{t.name}_int8", f"{t.name}_row_scale", f"{p}_axes"
        new_inits.update({qname: q, sname: scale, axes: np.array([-1], np.int64)})
        replace.append(
            (
                node,
                [
                    helper.make_node("Gather", [qname, node.input[1]], [f"{p}_q"], name=f"{p}_gather", axis=0),
                    helper.make_node("Cast", [f"{p}_q"], [f"{p}_f"], name=f"{p}_cast", to=onnx.TensorProto.FLOAT),
                    helper.make_node("Gather", [sname, node.input[1]], [f"{p}_s"], name=f"{p}_scale", axis=0),
                    helper.make_node("Unsqueeze", [f"{p}_s", axes], [f"{p}_su"], name=f"{p}_unsqueeze"),
                    helper.make_node("Mul", [f"{p}_f", f"{p}_su"], list(node.output), name=f"{p}_dequantize"),
                ],
            )
        )
        dropped.add(t.name)
        done.append({"weight": t.name, "shape": [int(x) for x in t.dims]})
    if not done:
        return model, {"int8_embedding": []}
    replace_nodes(model.graph, replace)
    remove_initializers(model.graph, dropped)
    add_initializers(model.graph, new_inits)
    return model, {"int8_embedding": done}
