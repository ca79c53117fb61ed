"""Fuse each decoder layer's attention subgraph into one ONNX Runtime contrib attention op.

The exported graph spells attention out as Reshape/Transpose per head, Concat with the past KV, a
Reshape/Transpose/Reshape to get K', two scaling Muls, MatMul, Add(mask bias), Softmax, a NaN guard,
MatMul with V, and a Transpose back. One ``com.microsoft.MultiHeadAttention`` node does the same work
on [batch, seq, hidden] Q/K/V, takes the past KV in [batch, heads, past, head_dim] and returns the
present KV in that layout, so it keeps the graph's inputs and outputs exactly as they are.

The additive mask the graph already builds from ``attention_mask`` (causal and left padding) is passed
as ``attention_bias``, so masking semantics are the graph's own; only its fill value for masked
scores is raised to -10000 so it stays finite in float16 (see ``MASK_FILL``).

``GroupQueryAttention`` (``op=GQA``) also lets the KV cache live in one buffer per tensor that is both
``past`` and ``present`` (``kv_cache="shared"`` in the report): its extra inputs (``seqlens_k``,
``total_sequence_length``) are computed inside the graph from ``attention_mask``. The node is written in the
oldest input schema that takes the mask bias (11 inputs, ``attention_bias`` last: ONNX Runtime 1.22), not
with the later optional inputs (head sink, per-row query lengths), so the same graph loads on every runtime
from 1.22 on, onnxruntime-gpu and onnxruntime-node included. In that schema a multi-token step with past
(the chunked prompt step) runs for batch 1 only; the runtime runs a batch's prompt in one step. Every other
use of the past length (the exporter reads it from the past tensors' shape) is rewritten to
``attention_mask`` width - ``input_ids`` width. The graph then still follows the plain contract (past of
length P, present of length P + S) and also accepts a past buffer of any capacity >= P + S bound to the
same memory as its present: the new positions are written in place and nothing is copied or
concatenated per step.

``GroupQueryAttention`` takes Q/K/V packed in one [batch, seq, 3 * hidden] tensor: where the three come from
one equal Split of the QKV projection, the node reads the projection itself and the Split goes (``pack_qkv``;
going back to MultiHeadAttention puts the Split back).

Every layer is matched completely before anything is rewritten; a layer that does not match is left
as it is and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import QuantError
from .graph import (
    GraphIndex,
    add_initializers,
    attr,
    ensure_opset,
    insert_nodes,
    opset,
    prune_value_info,
    remove_dead_nodes,
    remove_nodes,
    rename_input,
    replace_nodes,
)

MHA = "MultiHeadAttention"
GQA = "GroupQueryAttention"
OPS = (MHA, GQA)
MS_DOMAIN = "com.microsoft"


@dataclass
class LayerMatch:
    """Everything one layer's rewrite needs, found by ``match_layer``."""

    softmax: onnx.NodeProto
    query: str
    key: str
    value: str
    past_key: str
    past_value: str
    present_key: str
    present_value: str
    mask_bias: str
    scale: float
    out_transpose: onnx.NodeProto
    present_concats: list = field(default_factory=list)


# ---------------------------------------------------------------- matching helpers


def _scaled(index: GraphIndex, name: str) -> tuple[str, float] | None:
    """``name`` = x * c or x / c with c a constant scalar -> (x, factor); else (name, 1.0)."""
    node = index.producer.get(name)
    if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in ("Mul", "Div"):
        return name, 1.0
    a, b = node.input[0], node.input[1]
    cb = index.scalar(b)
    if cb is not None:
        if node.op_type == "Div":
            return (a, 1.0 / cb) if cb != 0 else None
        return a, cb
    ca = index.scalar(a)
    if ca is not None and node.op_type == "Mul":
        return b, ca
    return name, 1.0


def _split_heads_source(index: GraphIndex, name: str, num_heads: int, head_dim: int) -> str | None:
    """``name`` = Transpose[0,2,1,3](Reshape(x, [B, S, N|-1, H])) with x [B, S, hidden] -> x."""
    tr = index.producer.get(name)
    if tr is None or tr.op_type != "Transpose" or tr.domain not in ("", "ai.onnx"):
        return None
    if list(attr(tr, "perm", [])) != [0, 2, 1, 3]:
        return None
    rs = index.parent(tr, 0, "Reshape")
    if rs is None or len(index.consumers[rs.output[0]]) != 1:
        return None
    if not _is_head_shape(index, rs.input[1], num_heads, head_dim):
        return None
    source = rs.input[0]
    return source if _is_rank3_hidden(index, source) else None


def _is_head_shape(index: GraphIndex, name: str, num_heads: int, head_dim: int) -> bool:
    """A 4-element reshape target whose last two entries are (num_heads or -1, head_dim)."""
    value = index.value(name)
    if value is not None:
        v = value.ravel().tolist()
        return len(v) == 4 and v[3] == head_dim and v[2] in (num_heads, -1) and 0 not in v[2:]
    cat = index.producer.get(name)
    if cat is None or cat.op_type != "Concat" or len(cat.input) != 4:
        return False
    n, h = index.value(cat.input[2]), index.value(cat.input[3])
    if n is None or h is None or n.size != 1 or h.size != 1:
        return False
    return int(h.ravel()[0]) == head_dim and int(n.ravel()[0]) in (num_heads, -1)


def _is_rank3_hidden(index: GraphIndex, name: str) -> bool:
    """``name`` is a [batch, seq, hidden] tensor: a third of a QKV Split on axis 2, or typed rank 3."""
    rank = index.rank(name)
    if rank is not None:
        return rank == 3
    sp = index.producer.get(name)
    if sp is not None and sp.op_type == "Split" and sp.domain in ("", "ai.onnx"):
        return attr(sp, "axis", 0) == 2
    return False


def _shape_slice(index: GraphIndex, name: str, of: str) -> tuple[int, int] | None:
    """``name`` = Slice(Shape(of), start, end[, axes=[0]]) -> (start, end)."""
    sl = index.producer.get(name)
    if sl is None or sl.op_type != "Slice" or len(sl.input) < 3:
        return None
    shape = index.parent(sl, 0, "Shape")
    if shape is None or shape.input[0] != of or attr(shape, "start", 0) != 0 or attr(shape, "end") is not None:
        return None
    if len(sl.input) > 3 and sl.input[3]:
        axes = index.value(sl.input[3])
        if axes is None or axes.ravel().tolist() != [0]:
            return None
    if len(sl.input) > 4 and sl.input[4]:
        steps = index.value(sl.input[4])
        if steps is None or steps.ravel().tolist() != [1]:
            return None
    start, end = index.value(sl.input[1]), index.value(sl.input[2])
    if start is None or end is None or start.size != 1 or end.size != 1:
        return None
    return int(start.ravel()[0]), int(end.ravel()[0])


def _is_last_dim(se) -> bool:
    return se is not None and se[0] == -1 and se[1] >= 4


def _is_second_last_dim(se) -> bool:
    return se is not None and se == (-2, -1)


def _transposed_key_source(index: GraphIndex, name: str) -> str | None:
    """``name`` = K with its last two axes swapped -> K.

    Accepts Transpose[0,1,3,2](K) and the exporter's Reshape([-1, T, H]) -> Transpose[0,2,1] ->
    Reshape([B, N, H, T]) whose target shapes are slices of Shape(K).
    """
    node = index.producer.get(name)
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Transpose":
        return node.input[0] if list(attr(node, "perm", [])) == [0, 1, 3, 2] else None
    if node.op_type != "Reshape":
        return None
    tr = index.parent(node, 0, "Transpose")
    if tr is None or list(attr(tr, "perm", [])) != [0, 2, 1]:
        return None
    inner = index.parent(tr, 0, "Reshape")
    if inner is None:
        return None
    key = inner.input[0]
    first = index.parent(inner, 1, "Concat")
    second = index.parent(node, 1, "Concat")
    if first is None or second is None or len(first.input) != 3 or len(second.input) != 3:
        return None
    lead = index.value(first.input[0])
    if lead is None or lead.ravel().tolist() != [-1]:
        return None
    t1, h1 = _shape_slice(index, first.input[1], key), _shape_slice(index, first.input[2], key)
    bn, h2, t2 = (_shape_slice(index, x, key) for x in second.input)
    if not (_is_second_last_dim(t1) and _is_second_last_dim(t2) and _is_last_dim(h1) and _is_last_dim(h2)):
        return None
    if bn is None or bn[1] != -2 or not (bn[0] == 0 or bn[0] <= -4):
        return None
    return key


def _present_concat(index: GraphIndex, name: str) -> tuple[onnx.NodeProto, str, str] | None:
    """``name`` = Concat(past, new, axis=2) with ``past`` a graph input -> (node, past, new)."""
    cat = index.producer.get(name)
    if cat is None or cat.op_type != "Concat" or cat.domain not in ("", "ai.onnx") or len(cat.input) != 2:
        return None
    if attr(cat, "axis") not in (2, -2):
        return None
    past, new = cat.input
    if past not in index.graph_inputs:
        return None
    return cat, past, new


def _past_shape_ok(model: onnx.ModelProto, name: str, num_heads: int, head_dim: int) -> bool:
    for vi in model.graph.input:
        if vi.name == name:
            dims = vi.type.tensor_type.shape.dim
            if len(dims) != 4 or vi.type.tensor_type.elem_type != TensorProto.FLOAT:
                return False
            n, h = dims[1], dims[3]
            return (not n.HasField("dim_value") or n.dim_value == num_heads) and (
                not h.HasField("dim_value") or h.dim_value == head_dim
            )
    return False


def match_layer(
    index: GraphIndex, model: onnx.ModelProto, softmax: onnx.NodeProto, num_heads: int, head_dim: int
) -> tuple[LayerMatch | None, str]:
    """Match the attention around one Softmax; returns (match, "") or (None, reason)."""
    if softmax.domain not in ("", "ai.onnx") or attr(softmax, "axis", -1) not in (-1, 3):
        return None, "softmax is not over the last axis"
    add = index.parent(softmax, 0, "Add")
    if add is None:
        return None, "softmax input is not an Add of scores and a mask bias"
    qk, mask_bias = None, None
    for i in (0, 1):
        scores = _scaled(index, add.input[i])
        if scores is None:
            continue
        node = index.producer.get(scores[0])
        if node is not None and node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            qk, mask_bias, post_scale = node, add.input[1 - i], scores[1]
            break
    if qk is None:
        return None, "scores are not a MatMul"
    if index.value(mask_bias) is not None or index.rank(mask_bias) not in (None, 4):
        return None, "mask bias is not a [batch, 1, seq, total] tensor"
    # Q side
    q = _scaled(index, qk.input[0])
    kt = _scaled(index, qk.input[1])
    if q is None or kt is None:
        return None, "bad Q/K scaling"
    scale = post_scale * q[1] * kt[1]
    query = _split_heads_source(index, q[0], num_heads, head_dim)
    if query is None:
        return None, "query is not a head split of a [batch, seq, hidden] tensor"
    present_key = _transposed_key_source(index, kt[0])
    if present_key is None:
        return None, "key side is not a transpose of the present key"
    kcat = _present_concat(index, present_key)
    if kcat is None:
        return None, "present key is not Concat(past_key, new_key)"
    key = _split_heads_source(index, kcat[2], num_heads, head_dim)
    if key is None:
        return None, "new key is not a head split of a [batch, seq, hidden] tensor"
    # probabilities, optionally NaN-guarded
    probs = softmax.output[0]
    users = index.consumers.get(probs, [])
    if len(users) == 2 and {u.op_type for u in users} == {"IsNaN", "Where"}:
        isnan = next(u for u in users if u.op_type == "IsNaN")
        where = next(u for u in users if u.op_type == "Where")
        zero = index.scalar(where.input[1])
        if where.input[0] != isnan.output[0] or where.input[2] != probs or zero != 0.0:
            return None, "unexpected NaN guard after softmax"
        if len(index.consumers.get(isnan.output[0], [])) != 1:
            return None, "NaN guard is shared"
        probs = where.output[0]
    pv = index.only_consumer(probs)
    if pv is None or pv.op_type != "MatMul" or pv.input[0] != probs:
        return None, "probabilities do not feed one MatMul with V"
    present_value = pv.input[1]
    vcat = _present_concat(index, present_value)
    if vcat is None:
        return None, "present value is not Concat(past_value, new_value)"
    value = _split_heads_source(index, vcat[2], num_heads, head_dim)
    if value is None:
        return None, "new value is not a head split of a [batch, seq, hidden] tensor"
    out_t = index.only_consumer(pv.output[0])
    if out_t is None or out_t.op_type != "Transpose" or list(attr(out_t, "perm", [])) != [0, 2, 1, 3]:
        return None, "attention output is not transposed back to [batch, seq, heads, head_dim]"
    for past in (kcat[1], vcat[1]):
        if not _past_shape_ok(model, past, num_heads, head_dim):
            return None, f"{past} is not float [batch, {num_heads}, past, {head_dim}]"
    if not np.isfinite(scale) or scale <= 0:
        return None, "attention scale is not a positive number"
    match = LayerMatch(
        softmax=softmax,
        query=query,
        key=key,
        value=value,
        past_key=kcat[1],
        past_value=vcat[1],
        present_key=present_key,
        present_value=present_value,
        mask_bias=mask_bias,
        scale=float(scale),
        out_transpose=out_t,
        present_concats=[kcat[0], vcat[0]],
    )
    leak = _self_contained(index, match)
    if leak:
        return None, f"intermediate tensor {leak} is used outside the attention subgraph"
    return match, ""


def _data_inputs(node: onnx.NodeProto, index: GraphIndex) -> list[str]:
    """Inputs that carry activations (not reshape targets or constant factors)."""
    if node.op_type in ("Reshape", "Transpose", "Softmax", "IsNaN"):
        return [node.input[0]]
    if node.op_type == "Where":
        return list(node.input)
    return [x for x in node.input if x and index.value(x) is None]


def _self_contained(index: GraphIndex, m: LayerMatch) -> str:
    """ "" when no tensor inside the matched subgraph is used outside it, else the offending tensor.

    The inside is every node on the data path from the sources (Q/K/V, past, mask bias) to the
    attention output and the present KV; the attention output and the presents may be used anywhere.
    """
    boundary = {m.query, m.key, m.value, m.past_key, m.past_value, m.mask_bias, m.present_key, m.present_value}
    inside = {id(n): n for n in m.present_concats}
    todo = [m.out_transpose, *m.present_concats]
    while todo:
        node = todo.pop()
        inside[id(node)] = node
        for name in _data_inputs(node, index):
            if name in boundary or name in index.graph_inputs or index.value(name) is not None:
                continue
            parent = index.producer.get(name)
            if parent is None:
                return name
            if id(parent) not in inside:
                todo.append(parent)
    free = {m.out_transpose.output[0], m.present_key, m.present_value}
    for node in inside.values():
        for out in node.output:
            if not out or out in free:
                continue
            if out in index.graph_outputs or any(id(u) not in inside for u in index.consumers.get(out, [])):
                return out
    return ""


# ---------------------------------------------------------------- rewriting


#: Fill for masked scores in the fused ops' bias: the contrib ops' own mask_filter_value. It stays
#: finite in float16 (the graph's float32 minimum becomes -inf there), so rows with every key masked
#: (queries on left padding) give finite values instead of NaN, and masked keys still get weight 0.
MASK_FILL = -10000.0


def _safe_mask_bias(graph: onnx.GraphProto, index: GraphIndex, name: str, cache: dict) -> str:
    """The mask bias for the fused ops: the graph's Where(cond, 0, fill) with fill raised to MASK_FILL.

    The unfused graph guards fully-masked softmax rows with IsNaN -> 0; the contrib kernels do not, so
    a fill that overflows (to -inf in half precision) must not reach them. Any other bias is used as is.
    """
    if name in cache:
        return cache[name]
    where = index.producer.get(name)
    consts = (
        None
        if where is None or where.op_type != "Where"
        else (index.value(where.input[1]), index.value(where.input[2]))
    )
    if consts is None or consts[0] is None or consts[1] is None or min(consts[0].min(), consts[1].min()) >= MASK_FILL:
        cache[name] = name
        return name
    dtype = consts[0].dtype if consts[0].dtype.kind == "f" else np.float32
    fill_name = f"{name}_fused_fill"
    add_initializers(graph, {fill_name: np.array(MASK_FILL, dtype)})
    ins = list(where.input)
    for k in (1, 2):
        if consts[k - 1].size == 1 and consts[k - 1].min() < MASK_FILL:
            ins[k] = fill_name
        elif consts[k - 1].min() < MASK_FILL:
            cache[name] = name  # a non-scalar constant: leave the graph's own bias
            return name
    out = f"{name}_fused"
    replace_nodes(graph, [(where, [where, helper.make_node("Where", ins, [out], name=f"{where.name}_fused")])])
    cache[name] = out
    return out


def _gqa_lengths(graph: onnx.GraphProto, prefix: str) -> tuple[str, str]:
    """GroupQueryAttention's length inputs, both int32, computed from ``attention_mask``.

    total_sequence_length is the mask's length; seqlens_k of a row is the column of its mask's last 1 (its
    total length - 1). With left padding (masked by the bias) every row's last column is 1, so that is
    total - 1 for each row; a row whose positions start at column 0 and end before the last column (a batch
    of rows of different lengths, padded on the right) attends to, and writes, its own positions only.
    """
    n = lambda s: f"{prefix}_{s}"  # noqa: E731
    if any(n("seqlens_k") in node.output for node in graph.node):
        return n("seqlens_k"), n("total")
    have = {i.name for i in graph.initializer}

    def const(name, arr):
        if f"{prefix}_{name}" not in have:
            add_initializers(graph, {f"{prefix}_{name}": np.asarray(arr)})
        return f"{prefix}_{name}"

    nodes = [
        helper.make_node("Shape", ["attention_mask"], [n("mask_shape")]),
        helper.make_node("Gather", [n("mask_shape"), const("idx1", np.int64(1))], [n("total64")], axis=0),
        helper.make_node("Cast", [n("total64")], [n("total")], to=TensorProto.INT32),
        helper.make_node("Cast", ["attention_mask"], [n("mask32")], to=TensorProto.INT32),
        helper.make_node("Range", [const("zero", np.int32(0)), n("total"), const("one", np.int32(1))], [n("cols")]),
        helper.make_node("Mul", [n("mask32"), n("cols")], [n("mask_cols")]),
        # the first maximum of mask x column: the last 1 (0 when only column 0 is set)
        helper.make_node("ArgMax", [n("mask_cols")], [n("last64")], axis=1, keepdims=0),
        helper.make_node("Cast", [n("last64")], [n("seqlens_k")], to=TensorProto.INT32),
    ]
    for i, node in enumerate(nodes):
        node.name = f"{prefix}_node{i}"
    insert_nodes(graph, nodes)
    return n("seqlens_k"), n("total")


def ragged_rows(model: onnx.ModelProto) -> bool:
    """True when every GroupQueryAttention takes each row's length from its mask's last 1 (``_gqa_lengths``),
    so a decode step may hold rows of different lengths, each at the start of its cache (right padding)."""
    graph = model.graph
    producer = {o: node for node in graph.node for o in node.output}
    gqa = [node for node in graph.node if node.op_type == GQA and node.domain == MS_DOMAIN]

    def from_argmax(name: str) -> bool:
        cast = producer.get(name)
        if cast is None or cast.op_type != "Cast":
            return False
        arg = producer.get(cast.input[0])
        return arg is not None and arg.op_type == "ArgMax"

    return bool(gqa) and all(len(node.input) > 5 and from_argmax(node.input[5]) for node in gqa)


def _shape_range(node: onnx.NodeProto) -> tuple[int, int]:
    """The [start, end) axes a Shape node reads from a rank-4 KV tensor."""
    start, end = attr(node, "start", 0), attr(node, "end", None)
    start = start + 4 if start < 0 else start
    end = 4 if end is None else (end + 4 if end < 0 else min(end, 4))
    return start, end


def _past_length_from_mask(graph: onnx.GraphProto, past: set[str], fused: set[str], prefix: str) -> str:
    """Make the past length come from the mask, not from the past tensors' shape; "" or the reason it can't.

    Shape(past)[2:3] becomes Shape(attention_mask)[1:2] - Shape(input_ids)[1:2]; slices of other axes
    (batch, heads, head size) are the same for a capacity buffer and stay. Any other reader of a past
    tensor outside the fused attention nodes means the buffer can not be shared.
    """
    rewrites = []
    for node in graph.node:
        used = [x for x in node.input if x in past]
        if not used or node.name in fused:
            continue
        if node.op_type != "Shape" or node.domain not in ("", "ai.onnx"):
            return f"{used[0]} is read by {node.op_type} {node.name}"
        start, end = _shape_range(node)
        if end <= 2 or start >= 3:
            continue
        if (start, end) != (2, 3):
            return f"{node.name} reads a shape range of {used[0]} that includes its length"
        if node.output[0] in {o.name for o in graph.output}:
            return f"{node.output[0]} is a graph output"
        rewrites.append(node)
    if not rewrites:
        return ""
    length = f"{prefix}_past_length"
    new = [
        helper.make_node(
            "Shape", ["attention_mask"], [f"{prefix}_mask_len"], start=1, end=2, name=f"{prefix}_mask_len"
        ),
        helper.make_node("Shape", ["input_ids"], [f"{prefix}_step_len"], start=1, end=2, name=f"{prefix}_step_len"),
        helper.make_node("Sub", [f"{prefix}_mask_len", f"{prefix}_step_len"], [length], name=f"{prefix}_past_length"),
    ]
    for node in rewrites:
        rename_input(graph, node.output[0], length)
    remove_nodes(graph, rewrites)
    insert_nodes(graph, new)
    return ""


def _make_attention(
    op: str,
    qkv: tuple[str, str, str],
    past: tuple[str, str],
    bias: str,
    outputs: list[str],
    name: str,
    num_heads: int,
    scale: float,
    lengths: tuple[str, str] | None,
) -> onnx.NodeProto:
    """One ``op`` node: each contrib op's input order in one place (GQA also takes ``lengths``)."""
    if op == MHA:
        inputs = [*qkv, "", "", bias, *past]
        extra = {}
    else:
        seqlens_k, total = lengths
        # 0-6 as ever, 7-9 rotary caches and position ids unused, 10 attention_bias: ONNX Runtime 1.22's schema
        inputs = [*qkv, *past, seqlens_k, total, "", "", "", bias]
        extra = {"kv_num_heads": num_heads}
    return helper.make_node(op, inputs, outputs, name=name, domain=MS_DOMAIN, num_heads=num_heads, scale=scale, **extra)


def _equal_split3(index: GraphIndex, node: onnx.NodeProto | None) -> bool:
    """``node`` splits its input into three equal parts along the last axis of a [batch, seq, 3 * hidden] tensor."""
    if node is None or node.op_type != "Split" or node.domain not in ("", "ai.onnx") or len(node.output) != 3:
        return False
    if attr(node, "axis", 0) not in (2, -1):
        return False
    if len(node.input) > 1 and node.input[1]:
        sizes = index.value(node.input[1])
        return sizes is not None and len(set(sizes.ravel().tolist())) == 1
    return True


def pack_qkv(graph: onnx.GraphProto) -> int:
    """Feed each fused GroupQueryAttention the packed QKV its Q/K/V were split from; returns how many."""
    index = GraphIndex(graph)
    packed = 0
    for node in graph.node:
        if node.op_type != GQA or node.domain != MS_DOMAIN or not all(node.input[:3]):
            continue
        if attr(node, "kv_num_heads") != attr(node, "num_heads"):
            continue
        split = index.producer.get(node.input[0])
        if _equal_split3(index, split) and list(split.output) == list(node.input[:3]):
            node.input[0], node.input[1], node.input[2] = split.input[0], "", ""
            packed += 1
    if packed:
        remove_dead_nodes(graph)
    return packed


def _unpacked(node: onnx.NodeProto, qkv: tuple[str, str, str], onnx_opset: int) -> tuple:
    """Q/K/V of a node for an op that takes them apart: a packed input gets its Split back."""
    if qkv[1] or qkv[2]:
        return qkv, []
    parts = tuple(f"{node.name}_{p}" for p in ("query", "key", "value"))
    count = {"num_outputs": 3} if onnx_opset >= 18 else {}  # before opset 18 a Split is equal by default
    split = helper.make_node("Split", [qkv[0]], list(parts), name=f"{node.name}_split_qkv", axis=2, **count)
    return parts, [split]


def _op_inputs(node: onnx.NodeProto) -> tuple[tuple[str, str, str], tuple[str, str], str]:
    """(Q/K/V, past K/V, mask bias) of a fused node, read back by its op's input order."""
    ins = list(node.input) + [""] * 17
    if node.op_type == MHA:
        return (ins[0], ins[1], ins[2]), (ins[6], ins[7]), ins[5]
    return (ins[0], ins[1], ins[2]), (ins[3], ins[4]), ins[10]


def _rewire_output(
    graph: onnx.GraphProto, index: GraphIndex, m: LayerMatch, fused_out: str, num_heads: int, head_dim: int, i: int
) -> list[onnx.NodeProto]:
    """Feed the fused [batch, seq, hidden] output to whatever read the [batch, seq, heads, head_dim] one."""
    t_out = m.out_transpose.output[0]
    users = index.consumers.get(t_out, [])
    if t_out not in index.graph_outputs and len(users) == 1 and users[0].op_type == "Reshape":
        target = index.value(users[0].input[1])
        if target is not None and 0 not in target.ravel().tolist()[2:]:
            for k, name in enumerate(users[0].input):
                if name == t_out:
                    users[0].input[k] = fused_out
            return []
    shape = f"fused_attention_{i}_heads_shape"
    add_initializers(graph, {shape: np.array([0, 0, num_heads, head_dim], np.int64)})
    return [helper.make_node("Reshape", [fused_out, shape], [t_out], name=f"fused_attention_{i}_heads")]


def _share_kv(graph: onnx.GraphProto) -> str:
    """Rewrite the past-length reads so the KV may live in one in-place buffer; "" or the reason it can't.

    Whether the result is shared is then decided from the graph alone (``kv_cache_mode``).
    """
    past = {i.name for i in graph.input if i.name.startswith("past_key_values.")}
    fused = {n.name for n in graph.node if n.op_type == GQA and n.domain == MS_DOMAIN}
    return _past_length_from_mask(graph, past, fused, "fused_attention_lengths")


def kv_cache_mode(model: onnx.ModelProto) -> str:
    """ "shared" when every past KV input is read only by GroupQueryAttention (and shape reads of axes
    other than the length) and every present is a GroupQueryAttention output, else "concat"."""
    graph = model.graph
    past = {i.name for i in graph.input if i.name.startswith("past_key_values.")}
    presents = {o.name for o in graph.output if o.name.startswith("present.")}
    if not past or len(past) != len(presents):
        return "concat"
    produced = {}
    for node in graph.node:
        for o in node.output:
            produced[o] = node
        for x in node.input:
            if x not in past:
                continue
            if node.op_type == GQA and node.domain == MS_DOMAIN:
                continue
            if node.op_type == "Shape" and node.domain in ("", "ai.onnx"):
                start, end = _shape_range(node)
                if end <= 2 or start >= 3:
                    continue
            return "concat"
    ok = all(p in produced and produced[p].op_type == GQA and produced[p].domain == MS_DOMAIN for p in presents)
    return "shared" if ok else "concat"


def retarget(model: onnx.ModelProto, op: str) -> tuple[onnx.ModelProto, int]:
    """Swap already-fused attention nodes to ``op`` (GroupQueryAttention <-> MultiHeadAttention).

    Both read the same Q/K/V, past KV and additive mask bias, so the swap is exact. Going to
    MultiHeadAttention gives a graph for providers whose GroupQueryAttention kernel takes no bias
    (CUDA); the past length stays derived from the mask, which the plain contract satisfies.
    Returns (model, number of nodes swapped); the input is not modified.
    """
    if op not in OPS:
        raise QuantError(f"unknown attention op {op!r}; use one of {', '.join(OPS)}")
    other = GQA if op == MHA else MHA

    def swappable(n):
        return n.op_type == other and n.domain == MS_DOMAIN and n.name.startswith("fused_attention_")

    if not any(swappable(n) for n in model.graph.node):
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    lengths = _gqa_lengths(graph, "fused_attention_lengths") if op == GQA else None
    todo = [n for n in graph.node if swappable(n)]
    swaps = []
    for node in todo:
        qkv, past, bias = _op_inputs(node)
        qkv, split = _unpacked(node, qkv, opset(out))
        new = _make_attention(
            op, qkv, past, bias, list(node.output), node.name, attr(node, "num_heads"), attr(node, "scale"), lengths
        )
        swaps.append((node, [*split, new]))
    replace_nodes(graph, swaps)
    if op == GQA:
        _share_kv(graph)
        pack_qkv(graph)
    remove_dead_nodes(graph)
    return out, len(todo)


def _has_subgraphs(graph: onnx.GraphProto) -> bool:
    return any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute
    )


def fuse_attention(
    model: onnx.ModelProto, num_heads: int, hidden_size: int, op: str = MHA
) -> tuple[onnx.ModelProto, dict]:
    """Rewrite every matching layer's attention into one ``op`` node; returns (model, report).

    The graph's inputs and outputs are unchanged. ``model`` is not modified; a copy is returned
    (the same object when nothing matched).
    """
    if op not in OPS:
        raise QuantError(f"unknown attention op {op!r}; use one of {', '.join(OPS)}")
    if num_heads < 1 or hidden_size < 1 or hidden_size % num_heads:
        raise QuantError(
            f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}; pass the model's n_embd and n_head"
        )
    head_dim = hidden_size // num_heads
    report = {
        "fused": 0,
        "op": op,
        "softmax": 0,
        "unmatched": [],
        "nodes_before": len(model.graph.node),
        "kv_cache": "concat",
    }
    if _has_subgraphs(model.graph):
        report["unmatched"].append("graph has control-flow subgraphs")
        report["nodes_after"] = report["nodes_before"]
        return model, report

    index = GraphIndex(model.graph)
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")]
    report["softmax"] = len(softmaxes)
    matches = []
    for sm in softmaxes:
        m, reason = match_layer(index, model, sm, num_heads, head_dim)
        if m is None:
            report["unmatched"].append(f"{sm.name}: {reason}")
        else:
            matches.append(m)
    presents = [p for m in matches for p in (m.present_key, m.present_value)]
    if len(set(presents)) != len(presents):
        report["unmatched"].append("layers share a present KV tensor")
        matches = []
    if not matches:
        swapped, n = retarget(model, op)
        report["retargeted"] = n
        report["nodes_after"] = len(swapped.graph.node)
        report["kv_cache"] = kv_cache_mode(swapped)
        return swapped, report

    if op == GQA and not {"attention_mask", "input_ids"} <= index.graph_inputs:
        report["unmatched"].append("GroupQueryAttention needs the graph inputs attention_mask and input_ids")
        report["nodes_after"] = report["nodes_before"]
        return model, report

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    # the copy keeps node order: re-resolve the matched nodes by position before anything moves
    originals = list(model.graph.node)
    position = {id(n): k for k, n in enumerate(originals)}
    copied = list(graph.node)

    def twin(node):
        k = position.get(id(node))
        return copied[k if k is not None else originals.index(node)]

    resolved = [
        LayerMatch(
            **{
                **m.__dict__,
                "softmax": twin(m.softmax),
                "out_transpose": twin(m.out_transpose),
                "present_concats": [twin(c) for c in m.present_concats],
            }
        )
        for m in matches
    ]
    index = GraphIndex(graph)
    bias_cache: dict = {}
    lengths = _gqa_lengths(graph, "fused_attention_lengths") if op == GQA else None
    for i, m in enumerate(resolved):
        bias = _safe_mask_bias(graph, index, m.mask_bias, bias_cache)
        fused_out = f"fused_attention_{i}_output"
        node = _make_attention(
            op,
            (m.query, m.key, m.value),
            (m.past_key, m.past_value),
            bias,
            [fused_out, m.present_key, m.present_value],
            f"fused_attention_{i}",
            num_heads,
            m.scale,
            lengths,
        )
        extra = _rewire_output(graph, index, m, fused_out, num_heads, head_dim, i)
        insert_nodes(graph, [node, *extra], before=m.out_transpose)
        remove_nodes(graph, m.present_concats)
    ensure_opset(out, MS_DOMAIN, 1)
    remove_dead_nodes(graph)
    if op == GQA:
        pack_qkv(graph)
        unfused = len(softmaxes) - len(matches)
        report["kv_cache_reason"] = (
            f"{unfused} of {len(softmaxes)} attention layers are not fused" if unfused else _share_kv(graph)
        )
    report["kv_cache"] = kv_cache_mode(out)
    prune_value_info(graph)
    report["fused"] = len(matches)
    report["nodes_after"] = len(graph.node)
    return out, report
