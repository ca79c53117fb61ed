"""Memory layout of quantized variants: mapped external weights, the tied table held once, session advice."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="memory mappings are inspected through /proc (Linux)"
)


@pytest.fixture(scope="module")
def int8_package(tmp_path_factory, tiny_package):
    from gpt2deploy.quantizing import quantize_package

    dst = tmp_path_factory.mktemp("memory") / "pkg"
    shutil.copytree(tiny_package, dst)
    quantize_package(dst, "int8")
    return dst


def _session(model_or_path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _external(t) -> dict:
    return {e.key: e.value for e in t.external_data}


def test_int8_variant_is_mapped_with_one_tied_table(int8_package):
    import onnx

    from gpt2deploy.package import Package

    pkg = Package.open(int8_package)
    entry = pkg.variant("int8")
    assert [f["path"] for f in entry["files"]] == ["onnx/model_int8.onnx", "onnx/model_int8.onnx.data"]
    model = onnx.load(str(pkg.variant_path("int8")), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    head = next(n for n in model.graph.node if "logits" in n.output)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}
    assert head.op_type == "MatMulNBits" and attrs["bits"] == 8 and attrs["accuracy_level"] == 4
    table = inits[head.input[1]]
    assert table.data_type == onnx.TensorProto.UINT8 and table.dims[0] == 50257
    # the embedding lookup reads an alias: its own initializer over the very same bytes of the data file
    lookups = [
        n
        for n in model.graph.node
        if n.op_type == "Gather" and n.input[0] in inits and inits[n.input[0]].dims[:1] == table.dims[:1]
    ]
    assert len(lookups) == 1 and lookups[0].input[0] != table.name
    alias = inits[lookups[0].input[0]]
    assert _external(alias) == _external(table) and list(alias.dims) == list(table.dims)
    assert not [n for n in model.graph.node if table.name in n.input and n is not head]
    # large tensors start on page boundaries (memory-mappable); nothing large stays in the graph file
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL and int(_external(t)["length"]) >= 4096:
            assert int(_external(t)["offset"]) % 4096 == 0, t.name
        else:
            assert len(t.raw_data) < 1024, t.name
    # the data file holds the table once
    data = pkg.root / "onnx/model_int8.onnx.data"
    unique = {(e["offset"], e["length"]) for e in map(_external, model.graph.initializer) if e}
    assert data.stat().st_size < sum(int(ln) for _, ln in unique) + 4096 * len(unique)


def test_alias_reads_the_same_values_as_the_inline_graph(int8_package):
    import onnx

    from gpt2deploy.package import Package
    from gpt2deploy.runtime.session import DecoderSession

    pkg = Package.open(int8_package)
    ids = np.array([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]], np.int64)
    logits, _ = DecoderSession(pkg, "int8", "cpu", threads=1).forward(ids)
    inline = onnx.load(str(pkg.variant_path("int8")), load_external_data=True)  # alias and table: two copies
    for t in inline.graph.initializer:
        t.data_location = onnx.TensorProto.DEFAULT
        del t.external_data[:]
    sess = _session(inline)
    feed = {
        i.name: np.zeros([1, pkg.dims.n_head, 0, pkg.dims.head_dim], np.float32)
        for i in sess.get_inputs()
        if i.name.startswith("past")
    }
    feed.update(input_ids=ids, attention_mask=np.ones_like(ids), position_ids=np.arange(ids.shape[1])[None])
    want = sess.run(["logits"], feed)[0]
    np.testing.assert_array_equal(logits, want)


def test_save_mapped_aliases_only_gathers_of_prepacked_weights(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from quant.mapped import ALIAS_SUFFIX, save_mapped

    n, k, bs = 300, 64, 32
    rng = np.random.default_rng(0)
    b = rng.integers(0, 256, (n, k // bs, bs), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.02, n * (k // bs)).astype(np.float32)
    plain = rng.standard_normal((n, k)).astype(np.float32)
    nodes = [
        helper.make_node(
            "MatMulNBits",
            ["x", "B", "S"],
            ["y"],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=8,
            block_size=bs,
            accuracy_level=4,
        ),
        helper.make_node("Gather", ["B", "ids"], ["rows"], axis=0),
        helper.make_node("Gather", ["P", "ids"], ["prow"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [3]),
        ],
        [
            helper.make_tensor_value_info(o, t, None)
            for o, t in (("y", TensorProto.FLOAT), ("rows", TensorProto.UINT8), ("prow", TensorProto.FLOAT))
        ],
        [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S"), numpy_helper.from_array(plain, "P")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    feed = {"x": rng.standard_normal((1, k)).astype(np.float32), "ids": np.array([0, 7, 299], np.int64)}
    want = _session(model).run(None, feed)
    written = save_mapped(model, tmp_path / "m.onnx")
    assert [p.name for p in written] == ["m.onnx", "m.onnx.data"]
    saved = onnx.load(str(written[0]), load_external_data=False)
    assert [nd.input[0] for nd in saved.graph.node if nd.op_type == "Gather"] == ["B" + ALIAS_SUFFIX, "P"]
    got = _session(str(written[0])).run(None, feed)
    for g, w in zip(got, want, strict=False):
        np.testing.assert_array_equal(g, w)


@linux_only
def test_session_advises_its_weight_mappings(int8_package, tiny_package):
    from gpt2deploy.package import Package
    from gpt2deploy.runtime.memory import SPARSE_MIN
    from gpt2deploy.runtime.session import DecoderSession

    pkg = Package.open(int8_package)
    dec = DecoderSession(pkg, "int8", "cpu", threads=1)
    data = str((pkg.root / "onnx/model_int8.onnx.data").resolve())
    assert dec.memory["files"] == [data] and dec.memory["mappings"] > 0 and dec.memory["heap_trimmed"] is True
    assert dec.memory["sparse_mappings"] >= 1  # the tied table (50257 x 64 int8) is read a few rows at a time
    flags = []
    with open("/proc/self/smaps") as f:
        current = (None, 0)
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:
                start, end = (int(x, 16) for x in head[0].split("-"))
                current = (head[5] if len(head) >= 6 else None, end - start)
            elif line.startswith("VmFlags:") and current[0] == data:
                flags.append((current[1], line.split()[1:]))
    # large mappings: random access, no read-ahead; small ones (scales, biases) keep the default
    assert flags and all(("rr" in fl) == (size >= SPARSE_MIN) for size, fl in flags)
    logits, _ = dec.forward(np.array([[464, 2068, 7586]], np.int64))
    assert np.isfinite(logits).all()
    # the exported fp32 graph keeps its weights in a mapped data file too
    fp32 = Package.open(tiny_package)
    assert [e["path"] for e in fp32.variant("fp32")["files"]] == ["onnx/model.onnx", "onnx/model.onnx.data"]
    assert DecoderSession(fp32, "fp32", "cpu", threads=1).memory["mappings"] > 0


def test_single_file_variant_has_nothing_to_advise(tiny_portable_package):
    from gpt2deploy.package import Package
    from gpt2deploy.runtime.session import DecoderSession

    pkg = Package.open(tiny_portable_package)
    assert [e["path"] for e in pkg.variant("fp32")["files"]] == ["onnx/model.onnx"]
    assert DecoderSession(pkg, "fp32", "cpu", threads=1).memory["mappings"] == 0


def test_a_longer_generation_frees_the_smaller_cache_first(tiny_package, monkeypatch):
    """The model keeps one KV stepper per batch size for reuse; one too small is dropped before a larger one
    is allocated, so two caches are never held at once."""
    import gc
    import weakref

    import gpt2deploy
    import gpt2deploy.runtime.model as model_mod

    m = gpt2deploy.load(tiny_package, device="cpu", threads=1)
    ids = m.encode("The quick brown fox")
    m.generate_ids([ids], max_new_tokens=4)
    (small,) = m._pool
    same = small.capacity
    m.generate_ids([ids], max_new_tokens=2)  # fits: the pooled stepper is reused
    assert m._pool == [small]
    ref = weakref.ref(small)
    del small
    seen = []
    real = model_mod.KVStepper

    def watched(*args, **kwargs):
        gc.collect()
        seen.append(ref() is None)
        return real(*args, **kwargs)

    monkeypatch.setattr(model_mod, "KVStepper", watched)
    m.generate_ids([ids], max_new_tokens=20)
    assert seen == [True]
    (big,) = m._pool
    assert big.capacity > same
