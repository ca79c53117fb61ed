"""INT4: the embedding lookup reads the lm_head's MatMulNBits blocks, so the tied matrix is stored once.

``MatMulNBits`` keeps the lm_head as B [vocab, n_blocks, blob] (4- or 8-bit values in blocks along the
hidden axis), scales [vocab, n_blocks] and zero points. Row ``v`` of B is exactly the quantized
embedding row ``v``, so ``Gather(wte, ids)`` becomes a lookup into B with the same dequantization in
plain ONNX ops (Gather, BitwiseAnd/BitShift to unpack nibbles, Cast, Sub, Mul, Reshape). The fp32
table is dropped: one quantized copy in the file, read by both ops.
"""

from __future__ import annotations

import numpy as np

from .graph import consumers, initializers, producers
from .tied_int8 import _ids_rank


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _unpack_nibbles(arr: np.ndarray) -> np.ndarray:
    lo, hi = arr & 0x0F, arr >> 4
    return np.stack([lo, hi], axis=-1).reshape(*arr.shape[:-1], arr.shape[-1] * 2)


def dequantize_rows(b: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, bits: int, k: int) -> np.ndarray:
    """Numpy reference of the MatMulNBits weight: [N, K] rows (used to verify the tie)."""
    n, nb, _ = b.shape
    q = _unpack_nibbles(b) if bits == 4 else b
    q = q.reshape(n, nb, -1).astype(np.float32)
    if zp is None:
        z = np.full((n, nb), 2 ** (bits - 1), np.float32)
    else:
        z = (_unpack_nibbles(zp) if bits == 4 else zp)[:, :nb].astype(np.float32)
    return ((q - z[..., None]) * scales.reshape(n, nb)[..., None]).reshape(n, -1)[:, :k]


def share_tied_nbits(model) -> tuple:
    """Point the tied embedding Gather at the lm_head's MatMulNBits table; return ``(model, info)``."""
    import onnx
    from onnx import helper, numpy_helper

    inits, prods, uses = initializers(model), producers(model), consumers(model)
    head = prods.get("logits")
    if head is None or head.op_type != "MatMulNBits":
        return model, {"shared": False, "reason": "the logits do not come from a MatMulNBits lm_head"}
    a = _attrs(head)
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
    for node in model.graph.node:
        if (
            node.op_type != "Gather"
            or node.input[0] not in inits
            or any(x.i != 0 for x in node.attribute if x.name == "axis")
        ):
            continue
        t = inits[node.input[0]]
        if (
            t.data_type == onnx.TensorProto.FLOAT
            and list(t.dims) == [n, k]
            and all(u is node for u in uses.get(t.name, []))
        ):
            gathers.append(node)
    if len(gathers) != 1:
        return model, {"shared": False, "reason": "no single float embedding Gather of the lm_head's shape"}
    gather = gathers[0]
    ids_rank = _ids_rank(model, gather.input[1])
    if ids_rank is None:
        return model, {"shared": False, "reason": "the rank of the embedding indices is unknown"}
    w = numpy_helper.to_array(inits[gather.input[0]]).astype(np.float32)
    deq = dequantize_rows(b, scales, zp, bits, k)
    step = np.abs(scales).max()
    err = float(np.abs(deq - w).max())
    if err > step * (2**bits) / 2:  # not the same matrix (an untied head)
        return model, {"shared": False, "reason": "the lm_head is not tied to the embedding"}

    p = f"{gather.name or 'embedding'}_tied{bits}"
    keep = [0] * ids_rank
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
    new_nodes = []
    for node in model.graph.node:
        new_nodes.extend(nodes if node is gather else [node])
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    dropped = gather.input[0]
    kept = [t for t in model.graph.initializer if t.name != dropped]
    del model.graph.initializer[:]
    used = {i for node in nodes for i in node.input}
    model.graph.initializer.extend(
        kept + [numpy_helper.from_array(v, name) for name, v in consts.items() if name in used]
    )
    return model, {"shared": True, "weight": dropped, "bits": int(bits), "block_size": int(bs), "max_abs_error": err}
