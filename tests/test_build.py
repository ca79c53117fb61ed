"""build: export -> quantize -> check -> package in one rename; gates drop variants; deterministic; bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import BUILD_TOKENS, RANDOM_MODEL_GATES

from gpt2deploy import building
from gpt2deploy.manifest import VARIANT_FILES, load_manifest
from gpt2deploy.package import Package
from gpt2deploy.verify import verify_package

ALL = ("fp32", "int8", "int4")


def _strip(obj, key="created"):
    """The manifest without timestamps (``key`` at any depth)."""
    if isinstance(obj, dict):
        return {k: _strip(v, key) for k, v in obj.items() if k != key}
    if isinstance(obj, list):
        return [_strip(v, key) for v in obj]
    return obj


@pytest.fixture
def fast_export(monkeypatch, tiny_package):
    """Replace the export stage by a copy of the session's exported package of the same checkpoint."""
    calls = []

    def export(model, out, progress, opset):
        calls.append(model)
        shutil.copytree(tiny_package, out, dirs_exist_ok=True)

    monkeypatch.setattr(building, "_export", export)
    return calls


@pytest.fixture
def no_export(monkeypatch):
    def export(*a, **k):
        raise AssertionError("bad input must be refused before the export starts")

    monkeypatch.setattr(building, "_export", export)


def test_built_package_end_to_end(built_package):
    m = load_manifest(built_package)
    assert list(m["variants"]) == list(ALL)
    for name in ALL:
        v = m["variants"][name]
        assert v["file"] == VARIANT_FILES[name] and (built_package / v["file"]).is_file()
    for name in ALL[1:]:
        acc = m["variants"][name]["accuracy"]
        assert acc["passed"] is True and acc["reference"] == {"kind": "variant", "variant": "fp32"}
        assert acc["metrics"]["tokens"] == BUILD_TOKENS and set(acc["thresholds"]) >= {"ppl_delta", "top1", "kl_mean"}
        assert m["variants"][name]["size"] < m["variants"]["fp32"]["size"]
    assert m["build"] == {
        "variants": list(ALL),
        "reference": "fp32",
        "reference_in_package": True,
        "allow_regression": False,
        "rejected": {},
    }
    assert Package.open(built_package).integrity_problems() == []
    assert verify_package(built_package).ok
    onnx_files = sorted(p.name for p in (built_package / "onnx").iterdir())
    assert onnx_files == sorted(
        Path(f["path"]).name for n in ALL for f in m["variants"][n]["files"]
    )  # graphs + weight data
    assert [p.name for p in built_package.parent.iterdir()] == ["pkg"]  # no staging leftovers


def test_cli_build_is_deterministic(tmp_path, tiny_checkpoint, built_package, fast_export, cli):
    """A second build of the same checkpoint, through the CLI, writes the same manifest (timestamps aside).

    Its export stage is the session's separate export of that checkpoint (``tiny_package``), so both
    exports, quantizations and checks ran independently.
    """
    out = tmp_path / "again"
    gates = [a for g in RANDOM_MODEL_GATES for a in ("--threshold", g)]
    r = cli("build", tiny_checkpoint, "-o", out, "--max-tokens", BUILD_TOKENS, *gates)
    assert r.exit_code == 0, r.output
    assert fast_export == [str(tiny_checkpoint)]
    for stage in ("[quantize int8]", "[quantize int4]", "[check]", "[package]", "[build] export"):
        assert stage in r.stderr, stage
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["variant", "size", "vs", "fp32", "ppl", "Δ", "top-1", "gate"]
    rows = {line.split()[0]: line for line in lines[1:4]}
    assert list(rows) == list(ALL)
    assert rows["fp32"].rstrip().endswith("reference") and "1.00x" in rows["fp32"]
    for name in ALL[1:]:
        assert rows[name].rstrip().endswith("pass") and "%" in rows[name]
    assert lines[-1].startswith(f"wrote {out} (fp32, int8, int4;")
    assert _strip(load_manifest(out)) == _strip(load_manifest(built_package))
    assert load_manifest(out)["created"] and sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_failed_gate_drops_the_variant(tmp_path, fast_export, cli):
    out = tmp_path / "pkg"
    r = cli("build", "ckpt", "-o", out, "--variants", "int8,fp32", "--threshold", "top1=1.01", "--max-tokens", 256)
    assert r.exit_code == 1, r.output
    err = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and err[0].startswith("error: int8 failed the accuracy gate and was not packaged (int8: top1 ")
    assert "< 1.01" in err[0] and "--allow-regression" in err[0] and "Traceback" not in r.output
    row = next(line for line in r.stdout.splitlines() if line.startswith("int8 "))
    assert "FAIL (not packaged)" in row
    m = load_manifest(out)
    assert list(m["variants"]) == ["fp32"] and not (out / "onnx" / "model_int8.onnx").exists()
    assert m["build"]["rejected"]["int8"][0].startswith("top1 ") and m["build"]["variants"] == ["fp32", "int8"]
    assert verify_package(out).ok


def test_allow_regression_keeps_and_records_the_failure(tmp_path, fast_export, cli):
    from gpt2deploy.runtime.select import select_variant

    out = tmp_path / "pkg"
    r = cli(
        "build",
        "ckpt",
        "-o",
        out,
        "--variants",
        "fp32,int8",
        "--threshold",
        "top1=1.01",
        "--max-tokens",
        256,
        "--allow-regression",
    )
    assert r.exit_code == 0, r.output
    assert "warning: kept variants that failed their accuracy gate" in r.stderr
    assert "FAIL (kept: --allow-regression)" in r.stdout
    m = load_manifest(out)
    int8 = m["variants"]["int8"]
    assert (
        int8["accuracy"]["passed"] is False
        and int8["allowed_regression"] is True
        and int8["accuracy"]["thresholds"]["top1"] == 1.01
    )
    assert m["build"]["allow_regression"] is True and "int8" in m["build"]["rejected"]
    assert select_variant(m, "cpu")[0] == "fp32"  # auto-selection skips the failed variant
    assert verify_package(out).ok


def test_quantized_only_package_drops_fp32(tmp_path, fast_export):
    res = building.build_package("ckpt", tmp_path / "pkg", variants="int8", max_tokens=256)
    m = load_manifest(tmp_path / "pkg")
    assert res.variants == ["int8"] and list(m["variants"]) == ["int8"]
    assert not (tmp_path / "pkg" / "onnx" / "model.onnx").exists()
    assert m["build"]["reference_in_package"] is False and m["variants"]["int8"]["accuracy"]["passed"] is True
    assert verify_package(tmp_path / "pkg").ok
    assert [r["variant"] for r in res.rows] == ["int8"] and res.rows[0]["status"] == "pass"


def test_nothing_passes_writes_nothing(tmp_path, fast_export, cli):
    out = tmp_path / "pkg"
    r = cli("build", "ckpt", "-o", out, "--variants", "int8", "--threshold", "top1=1.01", "--max-tokens", 256)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.splitlines()[-1].startswith("error: no requested variant passed its accuracy gate (int8: top1 ")
    assert not out.exists() and list(tmp_path.iterdir()) == []


# -- interruption: no half package, no temp dirs ---------------------------------------------------


def test_interrupted_build_leaves_nothing(tmp_path, fast_export, monkeypatch, cli):
    def interrupt(path, mode, progress):
        assert (path / "onnx" / "model.onnx").is_file()  # the export is staged...
        raise KeyboardInterrupt

    monkeypatch.setattr(building, "_quantize", interrupt)
    out = tmp_path / "pkg"
    r = cli("build", "ckpt", "-o", out)
    assert r.exit_code == 130 and r.stderr.splitlines()[-1] == "error: interrupted; nothing was written"
    assert not out.exists() and list(tmp_path.iterdir()) == []  # ...and gone


def test_failure_mid_build_keeps_the_old_package(tmp_path, fast_export, monkeypatch, tiny_package):
    out = tmp_path / "pkg"
    shutil.copytree(tiny_package, out)
    before = (out / "manifest.json").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(building, "_check", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        building.build_package("ckpt", out, force=True, max_tokens=256)
    assert (out / "manifest.json").read_bytes() == before and verify_package(out).ok
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]


# -- bad input: refused before any work, one line, exit 2 ------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--variants", "fp32,int3"), "unknown variant 'int3' in --variants; choose from fp32, int8, int4, fp16"),
        (("--variants", " , "), "no variants given"),
        (("--threshold", "top9=0.5"), "unknown threshold 'top9'"),
        (("--threshold", "top1"), "threshold 'top1' is malformed"),
        (("--text", "/nonexistent/eval.txt"), "text file /nonexistent/eval.txt does not exist"),
        (("--max-tokens", "0"), "--max-tokens must be a positive integer"),
    ],
)
def test_bad_options(tmp_path, tiny_checkpoint, no_export, cli, args, needle):
    out = tmp_path / "pkg"
    r = cli("build", tiny_checkpoint, "-o", out, *args)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1 and needle in r.stderr, r.stderr
    assert not out.exists()


def test_bad_output_paths(tmp_path, tiny_checkpoint, no_export, cli):
    (tmp_path / "afile").write_text("x")
    r = cli("build", tiny_checkpoint, "-o", tmp_path / "afile")
    assert r.exit_code == 2 and "is a file" in r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    r = cli("build", tiny_checkpoint, "-o", tmp_path / "full")
    assert r.exit_code == 2 and "--force" in r.stderr and (tmp_path / "full" / "keep.txt").read_text() == "mine"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    for out in (ckpt, tmp_path):
        r = cli("build", ckpt, "-o", out, "--force")
        assert r.exit_code == 2 and "would replace the checkpoint" in r.stderr and "Traceback" not in r.output
    assert (ckpt / "config.json").is_file()


def test_empty_text_refused_before_export(tmp_path, tiny_checkpoint, no_export, cli):
    (tmp_path / "empty.txt").write_text("  \n")
    r = cli("build", tiny_checkpoint, "-o", tmp_path / "pkg", "--text", tmp_path / "empty.txt")
    assert r.exit_code == 2 and "is empty" in r.stderr


def test_short_text_refused_before_quantizing(tmp_path, fast_export, monkeypatch, cli):
    def never(*a, **k):
        raise AssertionError("quantization must not start")

    monkeypatch.setattr(building, "_quantize", never)
    (tmp_path / "short.txt").write_text("hello world")
    out = tmp_path / "pkg"
    r = cli("build", "ckpt", "-o", out, "--text", tmp_path / "short.txt")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.splitlines()[-1].startswith("error: the evaluation text") and "shorter than one window" in r.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["short.txt"]


def test_parse_variants():
    assert building.parse_variants(None) == ("fp32", "int8", "int4")
    assert building.parse_variants("int4, fp32,int4") == ("fp32", "int4")
    assert building.parse_variants(["fp16", "int8"]) == ("int8", "fp16")
