"""logits_to_keep: every variant projects only the last positions when asked, the same numbers as all of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpt2deploy.errors import UsageError
from gpt2deploy.package import Package
from gpt2deploy.runtime.generate import generate_ids
from gpt2deploy.runtime.kvcache import KVStepper
from gpt2deploy.runtime.options import GenerationOptions
from gpt2deploy.runtime.session import DecoderSession, positions_from_mask
from gpt2deploy.verify import verify_package

PAD = 50256
ROWS = np.array([[5, 17, 300, 42, 9, 1000, 77], [PAD, PAD, PAD, 3, 4, 5, 6]], np.int64)
MASK = (ROWS != PAD).astype(np.int64)


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feed(dec: DecoderSession, keep: int | None) -> dict:
    d = dec.dims
    feed = {"input_ids": ROWS, "attention_mask": MASK, "position_ids": positions_from_mask(MASK)}
    for name in dec.past_names:
        feed[name] = np.zeros((2, d.n_head, 0, d.head_dim), np.float32)
    if keep is not None:
        feed["logits_to_keep"] = np.array([keep], np.int64)
    return feed


def _edit_manifest(root: Path, change) -> None:
    m = json.loads((root / "manifest.json").read_text())
    change(m)
    (root / "manifest.json").write_text(json.dumps(m, indent=2))


def test_pass_adds_the_input_once_and_needs_the_projection(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from exporters.errors import ExportError
    from exporters.logits_to_keep import add_logits_to_keep

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 3])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert add_logits_to_keep(model) is True
    assert add_logits_to_keep(model) is False
    onnx.checker.check_model(model)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    sess = _session(path)
    hidden = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    full = sess.run(None, {"x": hidden})[0]
    assert full.shape == (2, 5, 3)  # the default, 0, keeps every position
    for keep in (1, 2, 5, 9):
        got = sess.run(None, {"x": hidden, "logits_to_keep": np.array([keep], np.int64)})[0]
        np.testing.assert_array_equal(got, full[:, -min(keep, 5) :])

    bad = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["logits"])],
            "g",
            [x],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        )
    )
    with pytest.raises(ExportError, match="logits come from a Relu node"):
        add_logits_to_keep(bad)


def test_every_variant_projects_only_the_kept_positions(built_copy, cli):
    r = cli("quantize", built_copy, "--mode", "fp16")
    assert r.exit_code == 0, r.output
    pkg = Package.open(built_copy)
    assert [t["name"] for t in pkg.manifest["io"]["optional_inputs"]] == ["logits_to_keep"]
    assert set(pkg.variants) == {"fp32", "int8", "int4", "fp16"}
    for variant in pkg.variants:
        dec = DecoderSession(pkg, variant)
        assert dec.keeps_logits
        assert [i.name for i in dec.session.get_overridable_initializers()] == ["logits_to_keep"]
        full = dec.session.run(["logits"], _feed(dec, None))[0]
        assert full.shape[1] == ROWS.shape[1]
        for keep in (1, 3):
            kept = dec.session.run(["logits"], _feed(dec, keep))[0]  # computed for those positions alone
            assert kept.shape == (2, keep, dec.dims.vocab_size), variant
            np.testing.assert_allclose(kept, full[:, -keep:], atol=1e-5, err_msg=variant)
        via_forward, _ = dec.forward(ROWS, MASK, logits_to_keep=1)
        np.testing.assert_allclose(via_forward, full[:, -1:], atol=1e-5, err_msg=variant)
        prefill = KVStepper(dec, 2, ROWS.shape[1] + 4).prefill(ROWS, MASK)
        np.testing.assert_allclose(prefill, full[:, -1], atol=1e-5, err_msg=variant)
        with pytest.raises(UsageError, match="logits_to_keep must be >= 0"):
            dec.forward(ROWS, MASK, logits_to_keep=-1)
    assert verify_package(built_copy).ok


def test_packages_without_the_input_generate_the_same(built_package, built_copy):
    _edit_manifest(built_copy, lambda m: m["io"].pop("optional_inputs"))  # as packages written before it existed
    opts = GenerationOptions(max_new_tokens=8)
    rows = [[5, 17, 300, 42, 9], [3, 4, 5]]
    for variant in ("fp32", "int8"):
        new = DecoderSession(Package.open(built_package), variant)
        old = DecoderSession(Package.open(built_copy), variant)
        assert new.keeps_logits and not old.keeps_logits
        assert generate_ids(old, rows, opts).tokens == generate_ids(new, rows, opts).tokens
        # the prompt in chunks: every position of each chunk projected, the last one read
        chunked = [KVStepper(d, 2, ROWS.shape[1] + 2).prefill(ROWS, MASK, chunk=3) for d in (old, new)]
        np.testing.assert_allclose(chunked[0], chunked[1], atol=1e-5)
        a, _ = old.forward(ROWS, MASK, logits_to_keep=2)  # sliced after the full projection
        b, _ = new.forward(ROWS, MASK, logits_to_keep=2)
        assert a.shape == b.shape == (2, 2, new.dims.vocab_size)
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("reader", ["onnx", "onnxruntime"])
def test_verify_checks_the_optional_inputs(built_copy, reader):
    def change(m):
        m["io"]["optional_inputs"][0]["name"] = "tokens_to_keep"

    _edit_manifest(built_copy, change)
    problems = verify_package(built_copy, reader=reader).problems
    for f in ("onnx/model.onnx", "onnx/model_int8.onnx", "onnx/model_q4.onnx"):
        assert any(
            p.startswith(f"{f}: graph lacks the optional input tokens_to_keep the manifest lists") for p in problems
        ), problems
    assert len(problems) == 3


def test_portable_graph_takes_it_too(tiny_portable_package):
    dec = DecoderSession(Package.open(tiny_portable_package), "fp32")
    assert dec.keeps_logits and not dec.kv_shared  # plain ONNX: past and present as separate tensors
    full = dec.session.run(["logits"], _feed(dec, None))[0]
    kept = dec.session.run(["logits"], _feed(dec, 1))[0]
    assert kept.shape == (2, 1, dec.dims.vocab_size)
    np.testing.assert_allclose(kept, full[:, -1:], atol=1e-5)
    np.testing.assert_allclose(KVStepper(dec, 2, ROWS.shape[1] + 2).prefill(ROWS, MASK), full[:, -1], atol=1e-5)


@pytest.mark.slow
def test_untied_lm_head(tmp_path):
    """A fine-tune whose lm_head has its own weights: the same input, in every variant."""
    from conftest import SHAPE_A, make_checkpoint

    from gpt2deploy.exporting import export_package
    from gpt2deploy.quantizing import quantize_package

    ckpt = make_checkpoint(tmp_path / "ckpt", **{**SHAPE_A, "seed": 5}, tie_word_embeddings=False)
    out = export_package(str(ckpt), tmp_path / "pkg").path
    for mode in ("int8", "int4"):
        quantize_package(out, mode)
    pkg = Package.open(out)
    assert pkg.manifest["model"]["tie_word_embeddings"] is False
    for variant in ("fp32", "int8", "int4"):
        dec = DecoderSession(pkg, variant)
        assert dec.keeps_logits
        full = dec.session.run(["logits"], _feed(dec, None))[0][:, -1:]
        kept = dec.session.run(["logits"], _feed(dec, 1))[0]
        assert kept.shape == full.shape
        if variant != "int8":
            np.testing.assert_allclose(kept, full, atol=1e-5, err_msg=variant)
            assert (kept.argmax(-1) == full.argmax(-1)).all(), variant
            continue
        # int8 quantizes the head's input with one scale per call (over seven positions, then over one), and
        # the integer kernel differs by CPU kind: the tolerance is derived from the quantization (int8_bound)
        tol = _int8_head_tolerance(pkg, tmp_path)
        assert (np.abs(kept - full) <= tol).all(), float((np.abs(kept - full) - tol).max())
        top2 = np.sort(full, axis=-1)[..., -2:]
        clear = (top2[..., 1] - top2[..., 0]) > 2 * tol.max(axis=-1)  # argmax is fixed where the margin allows
        assert (kept.argmax(-1) == full.argmax(-1))[clear].all()


def _int8_head_tolerance(pkg, tmp_path) -> np.ndarray:
    """|kept - full| bound for the untied int8 head: each call's own bound against exact arithmetic, summed."""
    from int8_bound import call_bound, head_probe

    probe = head_probe(pkg.variant_path("int8"), tmp_path / "probe.onnx")
    sess = _session(tmp_path / "probe.onnx")
    dec = DecoderSession(pkg, "int8")
    bounds = []
    for keep in (None, 1):
        logits, x = sess.run(["logits", probe["input"]], _feed(dec, keep))
        rows = x.reshape(-1, x.shape[-1])
        bound = call_bound(rows, probe["wq"], probe["w_scale"], probe["w_zero"]).reshape(*x.shape[:-1], -1)
        # the bound holds for the call itself, on this CPU's kernel, against x @ W in exact arithmetic
        w = (probe["wq"].astype(np.float64) - probe["w_zero"].astype(np.float64)) * probe["w_scale"]
        exact = x.astype(np.float64) @ w
        assert (np.abs(logits - exact) <= bound).all()
        bounds.append(bound[:, -1:])
    return bounds[0] + bounds[1]
