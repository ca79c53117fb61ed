"""Untie the lm_head from the embedding so quantizers see it.

A tied GPT-2 lm_head is exported as ``MatMul(x, Transpose(wte))``: the weight reaches the MatMul
through a Transpose, so quantizers that look for a constant B skip it and the largest matrix of the
model stays float. ``untie_lm_head`` materializes ``wte.T`` as its own initializer feeding the MatMul;
the embedding Gather keeps reading the original ``wte`` (the quantizers decide what to do with it).
"""

from __future__ import annotations

import numpy as np

from .graph import add_initializers, consumers, drop_unused_initializers, initializers, producers, remove_nodes


def untie_lm_head(model) -> tuple:
    """Rewrite every ``MatMul(x, Transpose(W))`` with a 2-D initializer W; return ``(model, info)``."""
    from onnx import numpy_helper

    inits, prods, uses = initializers(model), producers(model), consumers(model)
    untied = []
    drop_nodes = []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        tr = prods.get(node.input[1])
        if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits:
            continue
        w = inits[tr.input[0]]
        perm = [a.ints for a in tr.attribute if a.name == "perm"]
        if len(w.dims) != 2 or (perm and list(perm[0]) != [1, 0]):
            continue
        name = f"{w.name}_transposed"
        if name not in inits:
            arr = np.ascontiguousarray(numpy_helper.to_array(w).T)
            add_initializers(model.graph, {name: arr})
            inits[name] = model.graph.initializer[-1]
        node.input[1] = name
        if all(u is node for u in uses.get(tr.output[0], [])) and tr.output[0] not in {
            o.name for o in model.graph.output
        }:
            if all(d is not tr for d in drop_nodes):
                drop_nodes.append(tr)
        untied.append({"node": node.name, "weight": w.name, "shape": [int(w.dims[1]), int(w.dims[0])]})
    remove_nodes(model.graph, drop_nodes)
    drop_unused_initializers(model.graph)
    return model, {"untied": untied}


def embedding_gathers(model) -> list:
    """Gather nodes whose data is a 2-D float initializer (token/position embeddings)."""
    inits = initializers(model)
    out = []
    for n in model.graph.node:
        if n.op_type == "Gather" and n.input[0] in inits:
            t = inits[n.input[0]]
            if len(t.dims) == 2 and t.data_type == 1:
                out.append(n)
    return out
