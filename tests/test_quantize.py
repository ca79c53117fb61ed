"""gpt2deploy quantize: INT8 / INT4 / FP16 variants of a tiny random package.

The variants are built once per module (one package copy holding all three) and then inspected:
accuracy against fp32 on real-text tokens, graph contents, sizes and manifest entries.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import EVAL_TEXT

MODES = ("int8", "int4", "fp16")
VARIANT_OF = {"int8": "int8", "int4": "int4", "fp16": "fp16"}
#: Relative RMS error of the logits vs fp32 (||a - b|| / ||b||) on real-text tokens, random tiny model.
REL_RMS = {"int8": 0.08, "int4": 0.4, "fp16": 0.005}
FALLBACK_TEXT = (
    "The river rose after three days of rain, and the ferry stopped running until the water went down. "
    "People in the village waited on the bank, talked about the harvest and watched the boats."
)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_package) -> dict:
    """A copy of the tiny package with int8, int4 and fp16 added; returns {"path", "results"}."""
    from gpt2deploy.quantizing import quantize_package

    dst = tmp_path_factory.mktemp("quantized") / "pkg"
    shutil.copytree(tiny_package, dst)
    results = {mode: quantize_package(dst, mode) for mode in MODES}
    return {"path": dst, "results": results}


def _text_ids(pkg, n: int) -> list[int]:
    from tokenizers import Tokenizer

    text = EVAL_TEXT.read_text(encoding="utf-8")[:4000] if EVAL_TEXT.is_file() else FALLBACK_TEXT * 4
    ids = Tokenizer.from_file(str(pkg.tokenizer_path)).encode(text).ids
    assert len(ids) >= n
    return ids[:n]


def _weight_matmul_bytes_fp32(model) -> int:
    from quant.report import matmul_weight_bytes

    return matmul_weight_bytes(model)["float"]


@pytest.mark.parametrize("mode", MODES)
def test_logits_close_to_fp32_prompt_and_decode(quantized, mode):
    from gpt2deploy.package import Package
    from gpt2deploy.runtime.session import DecoderSession

    pkg = Package.open(quantized["path"])
    ids = _text_ids(pkg, 41)
    prompt, nxt = np.array([ids[:40]]), np.array([ids[40:41]])
    ref = DecoderSession(pkg, "fp32", "cpu", threads=1)
    var = DecoderSession(pkg, VARIANT_OF[mode], "cpu", threads=1)
    r0, rp = ref.forward(prompt)
    v0, vp = var.forward(prompt)
    assert all(p.dtype == np.float32 and p.shape == q.shape for p, q in zip(vp, rp, strict=False))
    r1, _ = ref.forward(nxt, past=rp)
    v1, _ = var.forward(nxt, past=vp)
    for a, b in ((v0, r0), (v1, r1)):
        assert a.shape == b.shape and a.dtype == np.float32
        assert np.isfinite(a).all()
        rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
        assert rel < REL_RMS[mode], f"{mode}: relative logit error {rel:.4f} >= {REL_RMS[mode]}"
    # a decode step with past matches the same token run as part of the full sequence (int8 quantizes
    # activations per call, so a single-token step and a 41-token run differ slightly)
    full, _ = var.forward(np.array([ids[:41]]))
    step_vs_full = float(np.linalg.norm(full[:, -1] - v1[:, -1]) / np.linalg.norm(full[:, -1]))
    assert step_vs_full < REL_RMS[mode] / 2


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_every_weight_matmul_is_quantized_lm_head_included(quantized, mode):
    import onnx

    from quant.report import weight_matmuls

    path = quantized["path"]
    entry = quantized["results"][mode]["entry"]
    model = onnx.load(str(path / entry["file"]))
    mm = weight_matmuls(model)
    assert mm["float"] == [], f"float weight MatMuls left: {mm['float']}"
    ops = [n.op_type for n in model.graph.node]
    assert "Gemm" not in ops
    # 2 layers x 4 linear layers + the lm_head
    assert len(mm["quantized"]) == 2 * 4 + 1
    head = next(n for n in model.graph.node if "logits" in n.output)
    assert head.op_type == "MatMulNBits"  # int8: the 8-bit tied table, int4: 8-bit head by default
    # no float copy of the big tied matrix is left behind
    table = 50257 * 64
    big_float = [
        t.name
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) >= table
    ]
    assert big_float == []
    assert entry["recipe"]["quantized_matmuls"] == 9 and entry["recipe"]["skipped_matmuls"] == 0


def test_weight_size_ratios(quantized, tiny_package):
    """Bytes feeding the weight MatMuls (data + scales + zero points) vs their fp32 weights.

    The fp32 count includes the tied lm_head once (its [vocab, hidden] table), so it is the same set of
    matrices in both graphs. Whole files are compared too: the int8 file carries the tied table once.
    """
    import onnx

    from quant.report import matmul_weight_bytes

    fp32 = onnx.load(str(tiny_package / "onnx" / "model.onnx"))
    base = _weight_matmul_bytes_fp32(fp32)
    assert base > 0
    ratios = {}
    for mode in ("int8", "int4"):
        model = onnx.load(str(quantized["path"] / quantized["results"][mode]["entry"]["file"]))
        got = matmul_weight_bytes(model)
        assert got["float"] == 0
        ratios[mode] = got["quantized"] / base
    assert ratios["int8"] <= 0.30, ratios
    # default int4: 4-bit body, 8-bit lm_head (symmetric blocks of up to 128, capped at K: 1 + 4/block bytes a
    # weight); all-4-bit is checked in test_int4_all_4bit_with_head_bits_4
    assert ratios["int4"] <= 0.30, ratios
    model = onnx.load(str(quantized["path"] / quantized["results"]["int4"]["entry"]["file"]))
    body = [n for n in model.graph.node if n.op_type == "MatMulNBits" and "logits" not in n.output]
    inits = {t.name: t for t in model.graph.initializer}
    from quant.graph import tensor_bytes

    body_bytes = sum(tensor_bytes(inits[i]) for n in body for i in n.input[1:] if i in inits)
    body_fp32 = sum(
        4 * int(np.prod(inits[n.input[1]].dims[:1])) * next(a.i for a in n.attribute if a.name == "K") for n in body
    )
    assert body_bytes <= 0.20 * body_fp32, (body_bytes, body_fp32)
    res = quantized["results"]
    assert res["int8"]["summary"]["size_after"] <= 0.30 * res["int8"]["summary"]["size_before"]
    assert res["int4"]["summary"]["size_after"] <= 0.30 * res["int4"]["summary"]["size_before"]
    assert res["fp16"]["summary"]["size_after"] <= 0.51 * res["fp16"]["summary"]["size_before"]


def test_manifest_entries_valid(quantized):
    from gpt2deploy.fsutil import sha256_file
    from gpt2deploy.package import Package

    pkg = Package.open(quantized["path"])
    assert set(pkg.variants) == {"fp32", "int8", "int4", "fp16"}
    assert pkg.integrity_problems() == []
    expect_files = {"int8": "onnx/model_int8.onnx", "int4": "onnx/model_q4.onnx", "fp16": "onnx/model_fp16.onnx"}
    # int8/int4 take the in-place KV cache (GroupQueryAttention: CPU only); fp16 keeps MultiHeadAttention for CUDA
    expect_prov = {
        "int8": ["CPUExecutionProvider"],
        "int4": ["CPUExecutionProvider"],
        "fp16": ["CUDAExecutionProvider"],
    }
    expect_kv = {"int8": "shared", "int4": "shared", "fp16": "concat"}
    expect_attention = {"int8": "GroupQueryAttention", "int4": "GroupQueryAttention", "fp16": "MultiHeadAttention"}
    for mode in MODES:
        e = pkg.variant(mode)
        assert e["file"] == expect_files[mode]
        assert e["files"][0]["sha256"] == sha256_file(pkg.root / e["file"])
        assert e["size"] == sum((pkg.root / f["path"]).stat().st_size for f in e["files"])  # graph + weight data
        assert e["precision"] == mode
        assert e["providers"] == expect_prov[mode]
        assert e["kv_cache"] == expect_kv[mode] and e["recipe"]["fused"][expect_attention[mode]] == 2
        assert {"onnxruntime", "onnx"} <= set(e["libraries"])
        r = e["recipe"]
        for key in (
            "mode",
            "per_channel",
            "block_size",
            "accuracy_level",
            "excluded",
            "fused",
            "quantized_matmuls",
            "skipped_matmuls",
            "float_weight_fraction",
        ):
            assert key in r, key
        assert r["fused"].get("SkipLayerNormalization", 0) >= 4 and r["fused"].get("FastGelu", 0) == 2
        assert e["sample_check"]["finite"] is True
    assert pkg.variant("int4")["recipe"]["block_size"] == 32
    assert pkg.variant("int4")["recipe"]["accuracy_level"] == 4
    assert pkg.variant("int8")["recipe"]["float_weight_fraction"] < 0.1
    assert "CUDA" in pkg.variant("fp16")["note"] and "slower" in pkg.variant("fp16")["note"]
    assert "--attention mha" in pkg.variant("int4")["note"]
    assert not list(pkg.root.glob("onnx/.quantize.*")), "staging directories left behind"


def test_int4_with_mha_attention_is_cuda_capable(cli, package_copy):
    """--attention mha: MultiHeadAttention, separate past/present, CUDA among the providers; it still generates."""
    import gpt2deploy
    from gpt2deploy.package import Package

    r = cli("quantize", package_copy, "--mode", "int4", "--attention", "mha")
    assert r.exit_code == 0, r.stderr
    assert "past and present as separate tensors" in r.stderr
    e = Package.open(package_copy).variant("int4")
    assert e["kv_cache"] == "concat" and e["recipe"]["attention"] == "mha"
    assert e["providers"] == ["CPUExecutionProvider", "CUDAExecutionProvider"]
    assert e["recipe"]["fused"]["MultiHeadAttention"] == 2 and "GroupQueryAttention" not in e["recipe"]["fused"]
    model = gpt2deploy.load(package_copy, variant="int4", device="cpu")
    assert 1 <= len(model.generate_ids([[1, 2, 3]], max_new_tokens=5).tokens[0]) <= 5
    bad = cli("quantize", package_copy, "--mode", "int8", "--attention", "flash")
    assert bad.exit_code == 2 and "unknown attention 'flash'" in bad.stderr


def test_cli_summary_and_existing_variant_needs_force(cli, package_copy):
    r = cli("quantize", package_copy, "--mode", "int8", "--exclude", "lm_head")
    assert r.exit_code == 0, r.stderr
    assert "1 left float" in r.stderr and "8 quantized" in r.stderr
    assert "fused ops" in r.stderr and "SkipLayerNormalization" in r.stderr
    assert "model_int8.onnx" in r.stdout
    manifest = json.loads((package_copy / "manifest.json").read_text())
    assert len(manifest["variants"]["int8"]["recipe"]["excluded"]) == 1
    assert manifest["variants"]["int8"]["recipe"]["details"]["quantize_embedding"] is False  # embedding stays fp32
    before = (package_copy / "manifest.json").read_bytes()
    graph = (package_copy / "onnx/model_int8.onnx").read_bytes()
    r = cli("quantize", package_copy, "--mode", "int8")
    assert r.exit_code != 0
    assert r.stderr.startswith("error: ") and "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (package_copy / "manifest.json").read_bytes() == before
    assert (package_copy / "onnx/model_int8.onnx").read_bytes() == graph
    r = cli("quantize", package_copy, "--mode", "int8", "--per-channel", "--force")
    assert r.exit_code == 0, r.stderr
    manifest = json.loads((package_copy / "manifest.json").read_text())
    assert manifest["variants"]["int8"]["recipe"]["per_channel"] is True
    assert manifest["variants"]["int8"]["recipe"]["excluded"] == []


def test_fp16_cli_says_cuda(cli, package_copy):
    r = cli("quantize", package_copy, "--mode", "fp16")
    assert r.exit_code == 0, r.stderr
    assert "CUDA variant" in r.stderr and "slower" in r.stderr


def test_external_data_above_the_protobuf_limit(package_copy, monkeypatch):
    import quant.graph
    from gpt2deploy.package import Package
    from gpt2deploy.quantizing import quantize_package
    from gpt2deploy.runtime.session import DecoderSession

    monkeypatch.setattr(quant.graph, "PROTOBUF_LIMIT", 0)
    out = quantize_package(package_copy, "int4")
    files = [f["path"] for f in out["entry"]["files"]]
    assert files == ["onnx/model_q4.onnx", "onnx/model_q4.onnx.data"]
    assert all((package_copy / f).stat().st_mode & 0o777 == 0o644 for f in files)
    pkg = Package.open(package_copy)
    assert pkg.integrity_problems() == []
    logits, _ = DecoderSession(pkg, "int4", "cpu", threads=1).forward(np.array([[464, 3290, 318]]))
    assert np.isfinite(logits).all()


def test_int4_all_4bit_with_head_bits_4(cli, package_copy):
    import onnx

    from quant.report import matmul_weight_bytes

    r = cli("quantize", package_copy, "--mode", "int4", "--head-bits", "4", "--block-size", "16")
    assert r.exit_code == 0, r.stderr
    # the body in blocks of 16; the lm_head keeps its own default blocks (128, capped at the hidden size 64)
    assert "4-bit symmetric blocks of 64, shared with the embedding lookup" in r.stderr
    manifest = json.loads((package_copy / "manifest.json").read_text())
    recipe = manifest["variants"]["int4"]["recipe"]
    assert recipe["head_bits"] == 4 and recipe["block_size"] == 16 and recipe["skipped_matmuls"] == 0
    model = onnx.load(str(package_copy / "onnx/model_q4.onnx"))
    bits = {next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert bits == {4}
    fp32 = onnx.load(str(package_copy / "onnx/model.onnx"))
    assert matmul_weight_bytes(model)["quantized"] <= 0.20 * matmul_weight_bytes(fp32)["float"]


def test_int8_block_granularity(cli, package_copy):
    """--granularity block: every weight MatMul (lm_head included) is an 8-bit MatMulNBits, the embedding reads
    the head's blocks, logits stay within the int8 tolerance of fp32 and the variant generates."""
    from collections import Counter

    import onnx

    import gpt2deploy
    from gpt2deploy.package import Package
    from gpt2deploy.runtime.session import DecoderSession

    r = cli("quantize", package_copy, "--mode", "int8", "--granularity", "block", "--block-size", "32")
    assert r.exit_code == 0, r.stderr
    pkg = Package.open(package_copy)
    e = pkg.variant("int8")
    assert e["file"] == "onnx/model_int8.onnx"
    assert (
        e["recipe"]["granularity"] == "block" and e["recipe"]["block_size"] == 32 and e["recipe"]["accuracy_level"] == 4
    )
    assert e["recipe"]["quantized_matmuls"] == 9 and e["recipe"]["skipped_matmuls"] == 0
    model = onnx.load(str(package_copy / e["file"]))
    ops = Counter(n.op_type for n in model.graph.node)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 9 and ops["MatMul"] == 0 and ops["MatMulInteger"] == 0 and ops["DynamicQuantizeLinear"] == 0
    assert all(next(a.i for a in n.attribute if a.name == "bits") == 8 for n in nbits)
    assert any(n.output[0] == "logits" for n in nbits)
    ids = _text_ids(pkg, 40)
    ref, _ = DecoderSession(pkg, "fp32", "cpu", threads=1).forward(np.array([ids]))
    got, _ = DecoderSession(pkg, "int8", "cpu", threads=1).forward(np.array([ids]))
    assert float(np.linalg.norm(got - ref) / np.linalg.norm(ref)) < REL_RMS["int8"]
    assert (
        1
        <= len(
            gpt2deploy.load(package_copy, variant="int8", device="cpu")
            .generate_ids([[1, 2, 3]], max_new_tokens=4)
            .tokens[0]
        )
        <= 4
    )


def test_int8_untied_lm_head(cli, package_copy):
    """--untie-lm-head: the lm_head is its own int8 DynamicQuantizeMatMul weight, the embedding reads its own
    int8 rows (one scale a row), memory-mapped; logits stay within the int8 tolerance of fp32; it generates."""
    import onnx

    import gpt2deploy
    from gpt2deploy.package import Package
    from gpt2deploy.runtime.session import DecoderSession

    r = cli("quantize", package_copy, "--mode", "int8", "--untie-lm-head")
    assert r.exit_code == 0, r.stderr
    assert "untied from the embedding" in r.stderr
    pkg = Package.open(package_copy)
    e = pkg.variant("int8")
    assert e["recipe"]["tied_lm_head"] is False and e["recipe"]["quantized_matmuls"] == 9
    model = onnx.load(str(package_copy / e["file"]), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    assert "MatMulNBits" not in ops and ops.count("MatMulInteger") == 9
    # the embedding: int8 rows [vocab, hidden] with one float scale per row, page-aligned in the data file
    rows = [
        inits[n.input[0]]
        for n in model.graph.node
        if n.op_type == "Gather" and n.input[0] in inits and inits[n.input[0]].dims[:1] == [50257]
    ]
    kinds = sorted((t.data_type, len(t.dims)) for t in rows)
    assert kinds == [(onnx.TensorProto.FLOAT, 1), (onnx.TensorProto.INT8, 2)], kinds
    table = next(t for t in rows if t.data_type == onnx.TensorProto.INT8)
    assert int({x.key: x.value for x in table.external_data}["offset"]) % 4096 == 0
    assert not [
        t.name
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and t.dims[0] == 50257
    ]
    ids = _text_ids(pkg, 40)
    ref, _ = DecoderSession(pkg, "fp32", "cpu", threads=1).forward(np.array([ids]))
    got, _ = DecoderSession(pkg, "int8", "cpu", threads=1).forward(np.array([ids]))
    assert float(np.linalg.norm(got - ref) / np.linalg.norm(ref)) < REL_RMS["int8"]
    out = gpt2deploy.load(package_copy, variant="int8", device="cpu").generate_ids([[1, 2, 3]], max_new_tokens=4)
    assert 1 <= len(out.tokens[0]) <= 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode", "int4", "--granularity", "block"], "--granularity applies to int8 only"),
        (["--mode", "int8", "--granularity", "row"], "unknown granularity 'row'"),
        (["--mode", "int8", "--granularity", "block", "--per-channel"], "disagree"),
        (["--mode", "int8", "--block-size", "64"], "--block-size applies to int8 only with --granularity block"),
        (["--mode", "int8", "--granularity", "block", "--block-size", "48"], "power of two"),
        (["--mode", "int4", "--untie-lm-head"], "--untie-lm-head applies to int8"),
        (["--mode", "int8", "--granularity", "block", "--untie-lm-head"], "drop --granularity block"),
    ],
)
def test_int8_granularity_bad_input(cli, tiny_package, args, message):
    r = cli("quantize", tiny_package, *args)
    assert r.exit_code == 2 and message in r.stderr, r.stderr
