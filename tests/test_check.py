"""`gpt2deploy check`: gates pass for fp32 against itself, fail (exit 1) for a damaged variant, baselines,
the PyTorch reference, recording in the manifest, and every kind of bad input (exit 2, nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import GPT2_REF, assert_cli_error, requires_gpt2_ref

from gpt2deploy.accuracy.gates import DEFAULTS
from gpt2deploy.checking import check_package, model_identity
from gpt2deploy.package import Package

FAST = ("--max-tokens", "256")  # two windows of 128 on the tiny models
ACCURACY_KEYS = {"passed", "metrics", "thresholds", "reference", "text", "measured_on"}
#: loosen the gates a deliberately damaged variant crosses, so the baseline guard alone decides
LOOSE = (
    "-t",
    "top1=0",
    "-t",
    "top5=0",
    "-t",
    "greedy=0",
    "-t",
    "kl_mean=1",
    "-t",
    "kl_p99=1",
    "-t",
    "ppl_delta=1",
    "-t",
    "logit_max=100",
    "-t",
    "logit_p99=100",
)


def damage(root: Path, name: str = "int8", factor: float = 3.0, layer: int = 0) -> None:
    """Register a copy of the fp32 graph with one layer's MLP weights scaled as variant ``name``."""
    import onnx
    from onnx import numpy_helper

    from gpt2deploy.manifest import VARIANT_FILES, variant_entry

    model = onnx.load(str(root / VARIANT_FILES["fp32"]))
    target = f"model.transformer.h.{layer}.mlp.c_fc.weight"
    for init in model.graph.initializer:
        if init.name == target:
            scaled = numpy_helper.to_array(init) * np.float32(factor)
            init.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), target))
            break
    else:
        raise AssertionError(f"{target} not in the graph")
    rel = VARIANT_FILES[name]
    onnx.save(model, str(root / rel))
    entry = variant_entry(
        root,
        name,
        [rel],
        precision=name,
        opset=18,
        recipe={"test": f"layer {layer} MLP x{factor}"},
        providers=["CPUExecutionProvider"],
    )
    Package.open(root).update_manifest(lambda m: m["variants"].__setitem__(name, entry))


@pytest.fixture(scope="module")
def damaged_package(tmp_path_factory, tiny_package) -> Path:
    """fp32 + a damaged 'int8'. Read-only by convention (bad-input tests assert the manifest is unchanged)."""
    dst = tmp_path_factory.mktemp("check") / "pkg"
    shutil.copytree(tiny_package, dst)
    damage(dst)
    return dst


@pytest.fixture
def damaged_copy(tmp_path, damaged_package) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(damaged_package, dst)
    return dst


def _strict_json(path: Path) -> dict:
    def refuse(c):
        raise AssertionError(f"non-strict JSON constant {c} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _error_line(r) -> str:
    return assert_cli_error(r, code=None)


# -- gates ---------------------------------------------------------------------------------------


def test_fp32_against_itself_passes_and_is_recorded(package_copy, cli, tmp_path):
    out = tmp_path / "report.json"
    r = cli("check", package_copy, *FAST, "--json", out)
    assert r.exit_code == 0, r.output
    assert "PASS" in r.stdout and "fp32" in r.stdout
    assert "[check] checked in" in r.stderr and "100%" not in r.stderr  # no live display without a terminal
    report = _strict_json(out)
    v = report["variants"]["fp32"]
    assert v["passed"] and v["failures"] == []
    m = v["metrics"]
    assert m["ppl_delta"] == 0 and m["top1"] == 1 and m["top5"] == 1 and m["kl_mean"] == 0 and m["greedy"] == 1
    assert m["cache_diff"] < 1e-3 and m["batch_diff"] < 1e-3 and m["nonfinite"] == 0
    acc = Package.open(package_copy).variant("fp32")["accuracy"]
    assert set(acc) == ACCURACY_KEYS
    assert acc["passed"] and acc["metrics"] == m and acc["thresholds"] == v["thresholds"]
    assert acc["reference"] == {"kind": "variant", "variant": "fp32"}
    assert acc["text"]["tokens"] == 256 and len(acc["text"]["sha256"]) == 64 and "pydoc_data" in acc["text"]["source"]
    assert Package.open(package_copy).integrity_problems() == []


def test_damaged_variant_fails_with_exit_1(damaged_copy, cli, tmp_path):
    out = tmp_path / "report.json"
    r = cli("check", damaged_copy, *FAST, "--json", out)
    assert r.exit_code == 1, r.output
    err = _error_line(r)
    assert err.startswith("error: accuracy regression in int8") and "--threshold" in err
    assert "FAIL" in r.stdout
    report = _strict_json(out)  # the report is written even when the gates fail
    assert list(report["variants"]) == ["int8"] and report["passed"] is False  # fp32 is the reference
    v = report["variants"]["int8"]
    assert not v["passed"] and any(f.startswith("top1 ") for f in v["failures"])
    assert v["thresholds"] == DEFAULTS["int8"] and v["precision"] == "int8"
    assert v["metrics"]["kl_mean"] > 0 and v["metrics"]["top1"] < DEFAULTS["int8"]["top1"]
    acc = Package.open(damaged_copy).variant("int8")["accuracy"]
    assert acc["passed"] is False and set(acc) == ACCURACY_KEYS


@pytest.mark.parametrize("which", [["--all"], ["-v", "fp32,int8"]], ids=["all", "comma-list"])
def test_all_checks_every_variant_and_thresholds_override(damaged_copy, cli, which):
    r = cli("check", damaged_copy, *FAST, *which, "--no-record", *LOOSE)
    assert r.exit_code == 0, r.output
    assert "int8" in r.stdout and "fp32" in r.stdout
    assert "accuracy" not in Package.open(damaged_copy).variant("int8")  # --no-record


def test_metrics_are_deterministic_and_baseline_guard(damaged_copy, cli, tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert cli("check", damaged_copy, *FAST, "--json", first, *LOOSE).exit_code == 0
    r = cli("check", damaged_copy, *FAST, "--json", second, "--baseline", first, *LOOSE)
    assert r.exit_code == 0, r.output
    a, b = _strict_json(first), _strict_json(second)
    assert a["variants"]["int8"]["metrics"] == b["variants"]["int8"]["metrics"]  # bit-identical numbers
    assert all(d["worse_by"] == 0 for d in b["variants"]["int8"]["baseline"].values())

    # a better baseline (an earlier release): the same variant now regresses against it
    better = json.loads(first.read_text())
    m = better["variants"]["int8"]["metrics"]
    m["kl_mean"] /= 2
    m["top1"] = min(1.0, m["top1"] + 0.05)
    base = tmp_path / "better.json"
    base.write_text(json.dumps(better))
    r = cli("check", damaged_copy, *FAST, "--baseline", base, *LOOSE)
    assert r.exit_code == 1, r.output
    assert "worse than the baseline" in _error_line(r)
    # a tolerance wide enough accepts it
    r = cli("check", damaged_copy, *FAST, "--baseline", base, *LOOSE, "-t", "kl_mean.tol=1", "-t", "top1.tol=1")
    assert r.exit_code == 0, r.output


def test_library_report_and_pytorch_reference(package_copy, tiny_checkpoint):
    before = (package_copy / "manifest.json").read_bytes()
    steps = []
    report = check_package(
        package_copy,
        reference=str(tiny_checkpoint),
        max_tokens=128,
        record=False,
        on_step=lambda d, t, label: steps.append((d, t)),
    )
    assert (package_copy / "manifest.json").read_bytes() == before  # record=False writes nothing
    assert report["reference"]["kind"] == "pytorch" and len(report["reference"]["weights_sha256"]) == 64
    assert report["model"] == model_identity(Package.open(package_copy))
    v = report["variants"]["fp32"]  # with a PyTorch reference, fp32 itself is checked
    assert v["passed"], v["failures"]
    assert 0 < v["metrics"]["logit_max"] < 1e-3 and v["metrics"]["top1"] == 1.0
    assert steps[-1][0] == steps[-1][1]


# -- bad input: one line, exit 2, nothing written ------------------------------------------------


def _other_model_report(pkg: Path, **model_changes) -> dict:
    identity = model_identity(Package.open(pkg))
    identity.update(model_changes)
    return {
        "format": "gpt2deploy-check-report",
        "version": 1,
        "model": identity,
        "text": {"source": "x", "sha256": "0" * 64, "tokens": 256},
        "variants": {},
    }


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, damaged_package, tiny_checkpoint_b):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("  \n\n")
    (d / "short.txt").write_text("Just a few words of text.")
    (d / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 100)
    other = d / "other-vocab"
    shutil.copytree(damaged_package, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model"]["vocab_size"] = 32000
    manifest["model"].update(eos_token_id=0, bos_token_id=0)  # token ids must be inside the vocabulary
    manifest["generation"].update(eos_token_id=0, bos_token_id=0)
    (other / "manifest.json").write_text(json.dumps(manifest))
    (d / "other-model.json").write_text(
        json.dumps(_other_model_report(damaged_package, n_layer=12, weights_sha256="f" * 64))
    )
    (d / "not-json.json").write_text("{ nope")
    # right model, other text
    (d / "other-text.json").write_text(json.dumps(_other_model_report(damaged_package)))
    return d, tiny_checkpoint_b


BAD = [
    (["--variant", "int3"], "variant 'int3' is not in package"),
    (["--variant", "int8", "--all"], "either --variant or --all"),
    (["--text", "{d}/empty.txt"], "is empty"),
    (["--text", "{d}/missing.txt"], "does not exist"),
    (["--text", "{d}/binary.txt"], "not UTF-8"),
    (["--text", "{d}"], "is a directory"),
    (["--text", "{d}/short.txt"], "shorter than one window"),
    (["--max-tokens", "0"], "positive integer"),
    (["--max-tokens", "100"], "shorter than one window (128 tokens)"),
    (["--threshold", "kl_maen=0.1"], "unknown threshold 'kl_maen'"),
    (["--threshold", "kl_mean"], "malformed"),
    (["--threshold", "kl_mean=high"], "not a number"),
    (["--reference", "{b}"], "different dims"),
    (["--reference", "{d}/other-vocab"], "different vocabulary"),
    (["--reference", "int3"], "neither a variant"),
    (["--baseline", "{d}/other-model.json"], "another model"),
    (["--baseline", "{d}/other-text.json"], "other text"),
    (["--baseline", "{d}/not-json.json"], "not valid JSON"),
    (["--baseline", "{d}/missing.json"], "does not exist"),
    (["--json", "{d}"], "is a directory"),
    (["--device", "tpu"], "unknown device"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, needle, bad_inputs, damaged_package, cli, tmp_path):
    d, other_ckpt = bad_inputs
    before = (damaged_package / "manifest.json").read_bytes()
    out = tmp_path / "report.json"
    args = [a.format(d=d, b=other_ckpt) for a in args]
    extra = [] if "--json" in args else ["--json", out]
    r = cli("check", damaged_package, *FAST, *args, *extra)
    assert r.exit_code == 2, r.output
    assert needle in _error_line(r)
    assert (damaged_package / "manifest.json").read_bytes() == before
    assert not out.exists()


def test_bad_package_path(tmp_path, cli):
    r = cli("check", tmp_path / "nope")
    assert r.exit_code == 2 and "does not exist" in _error_line(r)


# -- a real trained model --------------------------------------------------------------------------


@requires_gpt2_ref
@pytest.mark.slow
def test_gpt2_ref_int8_passes_default_gates(tmp_path, cli):
    """Export the trained reference model, quantize it to int8 and check it under the default int8 gates."""
    from gpt2deploy.exporting import export_package
    from gpt2deploy.quantizing import quantize_package

    pkg = tmp_path / "ref-pkg"
    export_package(str(GPT2_REF), pkg)
    quantize_package(pkg, "int8")
    out = tmp_path / "report.json"
    r = cli("check", pkg, "--max-tokens", "512", "--json", out)
    assert r.exit_code == 0, r.output
    m = _strict_json(out)["variants"]["int8"]["metrics"]
    # a trained model gives peaked distributions: the numbers mean something here
    assert 20 < m["ppl_ref"] < 1000 and m["top1"] > 0.95 and m["kl_mean"] < 5e-3 and m["nonfinite"] == 0
    acc = Package.open(pkg).variant("int8")["accuracy"]
    assert (
        acc["passed"] and acc["thresholds"]["kl_mean"] == _strict_json(out)["variants"]["int8"]["thresholds"]["kl_mean"]
    )
