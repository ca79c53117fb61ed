"""Resolve ``--exclude`` entries to weight-MatMul node names of an optimized graph.

Node names change during optimization, so an entry may name a node, a weight initializer (stable:
``model.transformer.h.0.mlp.c_fc.weight``), a prefix of weight names ending in ``.``
(``model.transformer.h.0.``), or ``lm_head`` for the output projection.
"""

from __future__ import annotations

from .errors import QuantError
from .graph import initializers, producers
from .report import FLOAT_MATMUL_OPS, weight_source


def weight_nodes(model) -> dict:
    """Float weight MatMul/Gemm node name -> weight initializer name."""
    inits, prods = initializers(model), producers(model)
    out = {}
    for n in model.graph.node:
        if n.op_type in FLOAT_MATMUL_OPS and len(n.input) > 1:
            w = weight_source(model, n.input[1], inits, prods)
            if w is not None and len(w.dims) == 2:
                out[n.name] = w.name
    return out


def lm_head_nodes(model) -> list[str]:
    """Weight MatMuls whose output is the graph's ``logits`` (possibly through a Cast/Add)."""
    prods = producers(model)
    name = "logits"
    for _ in range(3):
        node = prods.get(name)
        if node is None:
            break
        if node.op_type in FLOAT_MATMUL_OPS:
            return [node.name]
        name = node.input[0]
    return []


def resolve_exclude(model, entries) -> list[str]:
    """Node names to leave in float for the given entries; an entry matching nothing is an error."""
    nodes = weight_nodes(model)
    picked: list[str] = []
    for entry in entries:
        entry = entry.strip()
        if not entry:
            continue
        if entry == "lm_head":
            hit = lm_head_nodes(model)
        elif entry.endswith("."):
            hit = [n for n, w in nodes.items() if w.startswith(entry)]
        else:
            hit = [n for n, w in nodes.items() if n == entry or w == entry or w == f"{entry}_transposed"]
        if not hit:
            examples = ", ".join(sorted(set(nodes.values()))[:2])
            raise QuantError(
                f"--exclude '{entry}' matches no weight MatMul; name a node, a weight (e.g. {examples}), a prefix "
                "ending in '.', or lm_head"
            )
        picked.extend(h for h in hit if h not in picked)
    return picked
