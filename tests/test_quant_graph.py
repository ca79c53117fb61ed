"""The graph toolkit (quant.graph): in-place node rewrites, initializers; quant/ has one import direction."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from quant.graph import (
    GraphIndex,
    add_initializers,
    attr,
    attrs,
    drop_unused_initializers,
    ensure_opset,
    insert_nodes,
    remove_dead_nodes,
    remove_nodes,
    rename_input,
    replace_nodes,
)

QUANT = Path(__file__).resolve().parent.parent / "quant"


def _chain(n: int = 4):
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=f"n{i}") for i in range(n)]
    x = helper.make_tensor_value_info("t0", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info(f"t{n}", TensorProto.FLOAT, [2])
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y]))


def test_replace_insert_remove_keep_order_and_identity():
    model = _chain()
    g = model.graph
    n0, n1, n2, n3 = list(g.node)
    a = helper.make_node("Identity", ["t1"], ["a"], name="a")
    b = helper.make_node("Identity", ["a"], ["b"], name="b")
    replace_nodes(g, [(n1, [a, n1, b]), (n3, [])])
    insert_nodes(g, [helper.make_node("Identity", ["t0"], ["first"], name="first")])
    insert_nodes(g, [helper.make_node("Identity", ["t2"], ["c"], name="c")], before=n2)
    assert [n.name for n in g.node] == ["first", "n0", "a", "n1", "b", "c", "n2"]
    n2.name = "renamed"  # untouched and kept nodes are still the graph's own objects
    n1.name = "kept"
    assert [n.name for n in g.node][3:] == ["kept", "b", "c", "renamed"]
    remove_nodes(g, [n0])
    assert "n0" not in [n.name for n in g.node]


def test_rename_initializers_and_dead_nodes():
    model = _chain(3)
    g = model.graph
    add_initializers(g, {"w": np.ones(2, np.float32), "unused": np.zeros(1, np.float32)})
    g.node.append(helper.make_node("Add", ["t3", "w"], ["dead"], name="dead"))
    rename_input(g, "t1", "t0")
    assert list(g.node[1].input) == ["t0"]
    assert remove_dead_nodes(g) == 2  # n0 no longer feeds anything, and "dead" reaches no output
    assert [t.name for t in g.initializer] == []
    add_initializers(g, {"kept": np.ones(1, np.float32)})
    g.node[0].input.append("kept")
    drop_unused_initializers(g)
    assert [t.name for t in g.initializer] == ["kept"]


def test_attributes_opsets_and_index():
    node = helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0])
    assert attr(node, "perm") == [1, 0] and attr(node, "missing", 7) == 7 and attrs(node) == {"perm": [1, 0]}
    model = _chain(2)
    ensure_opset(model, "com.microsoft", 1)
    ensure_opset(model, "com.microsoft", 1)
    assert sum(o.domain == "com.microsoft" for o in model.opset_import) == 1
    index = GraphIndex(model.graph)
    assert index.producer["t1"].name == "n0" and index.only_consumer("t1").name == "n1"
    assert index.only_consumer("t2") is None  # a graph output


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.add((node.module or "").split(".")[0])
    return out


def test_quant_modules_import_one_way():
    """No import cycle between quant's modules (at module level or inside functions)."""
    graph = {p.stem: _imports(p) for p in QUANT.glob("*.py")}
    state: dict[str, int] = {}

    def visit(mod, path):
        if state.get(mod) == 1:
            raise AssertionError(f"import cycle: {' -> '.join([*path, mod])}")
        if state.get(mod) == 2:
            return
        state[mod] = 1
        for dep in graph.get(mod, ()):
            visit(dep, [*path, mod])
        state[mod] = 2

    for mod in graph:
        visit(mod, [])


def test_node_lists_are_rewritten_only_by_the_toolkit():
    pattern = re.compile(r"del \w+(\.graph)?\.(node|initializer|value_info)\[:\]|\.node\.(insert|remove)\(")
    offenders = [
        f"{p.name}:{i}"
        for p in QUANT.glob("*.py")
        if p.name != "graph.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
