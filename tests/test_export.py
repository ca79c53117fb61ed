"""Export: graph contract, parity with PyTorch (prompt, decode, left-padded batch), manifest, bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_cli_error

from gpt2deploy.manifest import load_manifest
from gpt2deploy.package import Package


def _io(path: Path):
    m = onnx.load(str(path), load_external_data=False)
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    return m, {vi.name: dims(vi) for vi in m.graph.input}, {vi.name: dims(vi) for vi in m.graph.output}


def test_package_layout_and_manifest(tiny_package):
    pkg = Package.open(tiny_package)
    d = pkg.dims
    assert (d.n_layer, d.n_head, d.head_dim, d.hidden_size, d.vocab_size, d.n_positions) == (2, 4, 16, 64, 50257, 128)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "manifest.json", "onnx/model.onnx"):
        assert (tiny_package / name).is_file(), name
    fp32 = pkg.variant("fp32")
    assert fp32["file"] == "onnx/model.onnx" and fp32["precision"] == "fp32" and fp32["opset"] == 18
    assert fp32["parity"]["passed"] and fp32["parity"]["max_abs_diff"] <= 1e-4
    assert pkg.manifest["source"]["weights_sha256"] and len(pkg.manifest["source"]["weights_sha256"]) == 64
    assert pkg.integrity_problems() == []
    names = [i["name"] for i in pkg.manifest["io"]["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values.1.key",
        "past_key_values.1.value",
    ]


def test_graph_io_contract_and_tied_weight_stored_once(tiny_package):
    m, ins, outs = _io(tiny_package / "onnx" / "model.onnx")
    assert ins["input_ids"] == ["batch_size", "sequence_length"]
    assert ins["attention_mask"] == ["batch_size", "past_sequence_length + sequence_length"]
    assert ins["past_key_values.1.value"] == ["batch_size", 4, "past_sequence_length", 16]
    assert outs["logits"] == ["batch_size", "sequence_length", 50257]
    assert outs["present.0.key"] == ["batch_size", 4, "past_sequence_length + sequence_length", 16]
    for vi in m.graph.input[:3]:
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.INT64
    # The embedding (50257 x 64) appears once; the lm_head reuses it.
    big = [i for i in m.graph.initializer if 50257 in i.dims]
    assert len(big) == 1
    in_graph = sum(int(np.prod(i.dims)) for i in m.graph.initializer)
    n_params = Package.open(tiny_package).manifest["source"]["n_params"]  # unique parameters
    assert 0.99 * n_params <= in_graph <= n_params + 1024  # + a few small constants


def _ort_step(sess, n_layer, ids, mask, pos, past):
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for i in range(n_layer):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
    return sess.run(None, feed)


def test_past_zero_and_decode_match_full_recompute(tiny_package, tiny_checkpoint):
    """Independent of the exporter's own parity: ORT with cache == transformers without cache."""
    import onnxruntime as ort
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    sess = ort.InferenceSession(str(tiny_package / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[464, 2068, 7586, 21831, 18045, 625]], dtype=np.int64)
    past = [np.zeros((1, 4, 0, 16), np.float32)] * 4
    out = _ort_step(sess, 2, ids, np.ones_like(ids), np.arange(6)[None], past)
    seq = ids[0].tolist()
    for _ in range(5):
        nxt = int(out[0][0, -1].argmax())
        seq.append(nxt)
        with torch.no_grad():
            ref = model(torch.tensor([seq])).logits[0, -1].numpy()
        n = len(seq)
        out = _ort_step(sess, 2, np.array([[nxt]]), np.ones((1, n), np.int64), np.array([[n - 1]]), out[1:])
        assert out[1].shape == (1, 4, n, 16)
        assert np.abs(out[0][0, -1] - ref).max() <= 1e-4


def test_second_shape_exports_with_parity(tmp_path, tiny_checkpoint_b):
    from gpt2deploy.exporting import export_package

    res = export_package(str(tiny_checkpoint_b), tmp_path / "pkg")
    p = res.manifest["variants"]["fp32"]["parity"]
    assert p["passed"] and p["batch_left_padded"]["greedy_tokens_equal"]
    assert p["single"]["prompt_max_abs_diff"] <= 1e-4 and p["batch_left_padded"]["decode_max_abs_diff"] <= 1e-4
    _, ins, _ = _io(tmp_path / "pkg" / "onnx" / "model.onnx")
    assert ins["past_key_values.2.key"] == ["batch_size", 6, "past_sequence_length", 8]


def test_parity_failure_fails_export_and_leaves_nothing(tmp_path, tiny_checkpoint, cli):
    out = tmp_path / "pkg"
    r = cli("export", tiny_checkpoint, "-o", out, "--atol", "1e-12")
    assert r.exit_code == 1
    assert "disagrees with PyTorch" in r.stderr and "max abs logit diff" in r.stderr
    assert "Traceback" not in r.output
    assert not out.exists()
    assert [p for p in tmp_path.iterdir()] == []


def test_cli_export_success_and_force(tmp_path, tiny_checkpoint, cli):
    out = tmp_path / "pkg"
    r = cli("export", tiny_checkpoint, "-o", out)
    assert r.exit_code == 0, r.output
    assert "wrote" in r.stdout and "parity" in r.stderr
    load_manifest(out)
    r = cli("export", tiny_checkpoint, "-o", out)
    assert r.exit_code == 2 and "--force" in r.stderr
    r = cli("export", tiny_checkpoint, "-o", out, "--force")
    assert r.exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


@pytest.mark.slow
def test_pytorch_bin_weights_load(tmp_path, cli):
    from conftest import TOKENIZER_DIR

    from exporters.synthetic import make_random_checkpoint

    ckpt = make_random_checkpoint(
        tmp_path / "binckpt", TOKENIZER_DIR, n_layer=1, n_head=2, n_embd=32, n_positions=64, weights="bin"
    )
    assert (ckpt / "pytorch_model.bin").is_file() and not (ckpt / "model.safetensors").exists()
    r = cli("export", ckpt, "-o", tmp_path / "pkg")
    assert r.exit_code == 0, r.output


# -- bad input: one line, exit != 0, no traceback, nothing written ------------------------------


def _assert_clean_failure(r, out: Path, *needles: str, code: int = 2):
    assert_cli_error(r, *needles, code=code)
    assert not out.exists() or not any(out.iterdir())


def test_bad_missing_path(tmp_path, cli):
    out = tmp_path / "pkg"
    _assert_clean_failure(cli("export", tmp_path / "nope", "-o", out), out, "does not exist")


def test_bad_not_a_checkpoint(tmp_path, cli):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    out = tmp_path / "pkg"
    _assert_clean_failure(cli("export", tmp_path / "empty", "-o", out), out, "config.json")


def test_bad_non_gpt2_config(tmp_path, cli):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    out = tmp_path / "pkg"
    _assert_clean_failure(cli("export", d, "-o", out), out, "'bert'", "'gpt2'")


def test_bad_truncated_weights(tmp_path, tiny_checkpoint, cli):
    d = tmp_path / "trunc"
    shutil.copytree(tiny_checkpoint, d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])
    out = tmp_path / "pkg"
    _assert_clean_failure(cli("export", d, "-o", out), out, "truncated or corrupt")


def test_bad_corrupt_bin_weights(tmp_path, tiny_checkpoint, cli):
    d = tmp_path / "corrupt"
    shutil.copytree(tiny_checkpoint, d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(os.urandom(4096))
    out = tmp_path / "pkg"
    _assert_clean_failure(cli("export", d, "-o", out), out, "truncated or corrupt")


def test_bad_output_not_empty(tmp_path, tiny_checkpoint, cli):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = cli("export", tiny_checkpoint, "-o", out)
    assert r.exit_code == 2 and "--force" in r.stderr and "Traceback" not in r.output
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_unwritable_output(tmp_path, tiny_checkpoint, cli):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):  # root ignores mode bits; use a path under a file instead
            (tmp_path / "afile").write_text("x")
            out = tmp_path / "afile" / "pkg"
        else:
            out = parent / "pkg"
        r = cli("export", tiny_checkpoint, "-o", out)
        assert r.exit_code != 0 and r.stderr.startswith("error: ") and "Traceback" not in r.output
        assert not out.exists()
    finally:
        parent.chmod(0o700)


def test_bad_opset(tmp_path, tiny_checkpoint, cli):
    out = tmp_path / "pkg"
    _assert_clean_failure(cli("export", tiny_checkpoint, "-o", out, "--opset", "11"), out, "opset 11", "--opset")


def test_bad_hub_id_offline(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "pkg"
    _assert_clean_failure(cli("export", "someone/not-here-gpt2", "-o", out), out, "local checkpoint directory")


def test_external_data_above_protobuf_limit(tmp_path, tiny_checkpoint, monkeypatch):
    """Graphs over the 2 GB protobuf limit (gpt2-xl) keep weights in onnx/model.onnx.data, listed in the manifest."""
    import exporters.onnx_export as onnx_export
    from gpt2deploy.exporting import export_package

    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 1000)
    res = export_package(str(tiny_checkpoint), tmp_path / "pkg")
    fp32 = res.manifest["variants"]["fp32"]
    assert [f["path"] for f in fp32["files"]] == ["onnx/model.onnx", "onnx/model.onnx.data"]
    assert sorted(p.name for p in (tmp_path / "pkg" / "onnx").iterdir()) == ["model.onnx", "model.onnx.data"]
    onnx_dir = tmp_path / "pkg" / "onnx"
    assert (onnx_dir / "model.onnx").stat().st_size < 0.1 * (onnx_dir / "model.onnx.data").stat().st_size
    assert fp32["parity"]["passed"]
    assert Package.open(tmp_path / "pkg").integrity_problems() == []


def test_graph_carries_no_builder_paths_and_is_reproducible(tmp_path, tiny_package, tiny_checkpoint):
    """Exporting the same checkpoint from another location gives a byte-identical graph."""
    from gpt2deploy.exporting import export_package

    moved = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(tiny_checkpoint, moved)
    res = export_package(str(moved), tmp_path / "pkg")
    assert (
        res.manifest["variants"]["fp32"]["files"][0]["sha256"]
        == Package.open(tiny_package).variant("fp32")["files"][0]["sha256"]
    )
    m = onnx.load(str(tmp_path / "pkg" / "onnx" / "model.onnx"), load_external_data=False)
    assert not any(n.metadata_props for n in m.graph.node)
    assert str(Path.home()) not in (tmp_path / "pkg" / "onnx" / "model.onnx").read_bytes().decode("latin-1")


def test_default_graph_is_optimized_and_portable_is_plain_onnx(tiny_package, tiny_portable_package):
    """The default fp32 graph has fused attention with an in-place KV cache (CPU); --portable keeps plain ONNX.
    Both keep the same graph inputs and outputs and pass parity with PyTorch."""
    from collections import Counter

    opt, plain = Package.open(tiny_package).variant("fp32"), Package.open(tiny_portable_package).variant("fp32")
    assert (
        opt["kv_cache"] == "shared"
        and opt["providers"] == ["CPUExecutionProvider"]
        and opt["recipe"]["optimize"] is True
    )
    assert opt["recipe"]["fused"]["GroupQueryAttention"] == 2 and opt["recipe"]["fused"]["SkipLayerNormalization"] >= 4
    assert (
        plain["kv_cache"] == "concat"
        and "CUDAExecutionProvider" in plain["providers"]
        and plain["recipe"]["optimize"] is False
    )
    assert (
        opt["parity"]["max_abs_diff"] <= opt["parity"]["atol"]
        and plain["parity"]["max_abs_diff"] <= plain["parity"]["atol"]
    )
    g_opt = onnx.load(str(tiny_package / opt["file"]))
    g_plain = onnx.load(str(tiny_portable_package / plain["file"]))
    assert Counter(n.domain for n in g_plain.graph.node).keys() <= {"", "ai.onnx"}
    assert Counter(n.op_type for n in g_opt.graph.node)["GroupQueryAttention"] == 2
    assert [i.SerializeToString() for i in g_opt.graph.input] == [i.SerializeToString() for i in g_plain.graph.input]
    assert [o.SerializeToString() for o in g_opt.graph.output] == [o.SerializeToString() for o in g_plain.graph.output]


def test_cli_portable_flag(tmp_path, tiny_checkpoint, cli):
    r = cli("export", tiny_checkpoint, "-o", tmp_path / "p", "--portable")
    assert r.exit_code == 0, r.stderr
    assert "optimizing" not in r.stderr
    assert load_manifest(tmp_path / "p")["variants"]["fp32"]["kv_cache"] == "concat"
