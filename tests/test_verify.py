"""verify: schema, hashes, unlisted and escaping files, graph I/O contract; load refuses what verify rejects."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_cli_error

from gpt2deploy.errors import IntegrityError, PackageError
from gpt2deploy.manifest import load_manifest
from gpt2deploy.package import Package
from gpt2deploy.verify import verify_package

ALL = ("fp32", "int8", "int4")


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(root: Path, change) -> None:
    m = json.loads((root / "manifest.json").read_text())
    change(m)
    (root / "manifest.json").write_text(json.dumps(m, indent=2))


def _fails(r, *needles: str, code: int = 1) -> list[str]:
    """The run failed cleanly: exit code, one final 'error:' line, FAIL lines naming the problems."""
    text = r.stdout + assert_cli_error(r, code=code)
    for n in needles:
        assert n in text, text
    return [line for line in r.stdout.splitlines() if line.startswith("FAIL ")]


@pytest.mark.parametrize("reader", ["onnx", "onnxruntime"])
def test_built_package_verifies(built_package, reader):
    report = verify_package(built_package, reader=reader)
    assert report.ok, report.problems
    assert report.variants == list(ALL) and report.graphs_checked == len(ALL) and report.graph_reader == reader
    pkg = Package.open(built_package)
    assert report.files_checked == len(pkg.listed_files())


def test_cli_verify_ok(built_package, cli):
    r = cli("verify", built_package)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("ok ") and "fp32, int8, int4" in r.stdout and "3 graph I/O contracts" in r.stdout


def test_tampered_byte_fails_verify_and_load(built_copy, cli):
    _flip_byte(built_copy / "onnx" / "model_q4.onnx")
    lines = _fails(cli("verify", built_copy), "failed verification (1 problem)")
    assert lines == ["FAIL onnx/model_q4.onnx: sha256 differs from the manifest (file modified)"]
    with pytest.raises(IntegrityError, match="onnx/model_q4.onnx: sha256 differs"):
        Package.open(built_copy).check_integrity()
    Package.open(built_copy).check_integrity(["int8"])  # other variants stay loadable
    import gpt2deploy

    with pytest.raises(IntegrityError, match="model_q4.onnx"):
        gpt2deploy.load(built_copy, variant="int4", device="cpu")
    assert gpt2deploy.load(built_copy, variant="int8", device="cpu").variant == "int8"
    r = cli("run", built_copy, "--variant", "int4", "--device", "cpu", "--prompt", "Hello", "--max-new-tokens", 2)
    assert r.exit_code == 1 and "model_q4.onnx: sha256 differs" in r.stderr and "Traceback" not in r.output


def test_tampered_tokenizer_and_missing_and_truncated(built_copy, cli):
    _flip_byte(built_copy / "tokenizer.json", 10)
    (built_copy / "merges.txt").unlink()
    p = built_copy / "onnx" / "model_int8.onnx"
    p.write_bytes(p.read_bytes()[:-7])
    lines = _fails(cli("verify", built_copy), "(3 problems)")
    assert "FAIL tokenizer.json: sha256 differs from the manifest (file modified)" in lines
    assert "FAIL merges.txt: missing" in lines
    assert any(line.startswith("FAIL onnx/model_int8.onnx: size") and "truncated" in line for line in lines)


def test_unlisted_onnx_files_reported(built_copy, cli):
    shutil.copyfile(built_copy / "onnx" / "model.onnx", built_copy / "onnx" / "model_extra.onnx")
    (built_copy / "stray.onnx.data").write_bytes(b"\0" * 16)
    (built_copy / "NOTES.txt").write_text("other files are fine")
    lines = _fails(cli("verify", built_copy))
    assert sorted(lines) == [
        "FAIL onnx/model_extra.onnx: ONNX file not listed in the manifest; remove it or rebuild the package",
        "FAIL stray.onnx.data: ONNX file not listed in the manifest; remove it or rebuild the package",
    ]


def test_symlinks_pointing_outside_are_refused(built_copy, tmp_path, cli):
    outside = tmp_path / "outside"
    outside.mkdir()
    # a listed file replaced by a symlink to an identical copy outside the package
    shutil.copyfile(built_copy / "vocab.json", outside / "vocab.json")
    (built_copy / "vocab.json").unlink()
    (built_copy / "vocab.json").symlink_to(outside / "vocab.json")
    # an unlisted symlink to a directory outside
    (built_copy / "extra").symlink_to(outside, target_is_directory=True)
    lines = _fails(cli("verify", built_copy))
    assert len(lines) == 2
    assert lines[0].startswith("FAIL vocab.json: points outside the package") or lines[1].startswith(
        "FAIL vocab.json: points outside the package"
    )
    assert any(line.startswith("FAIL extra: symlink points outside the package") for line in lines)
    with pytest.raises(IntegrityError, match="vocab.json: points outside the package"):
        Package.open(built_copy).check_integrity()


def test_symlink_inside_the_package_is_fine(built_copy, cli):
    (built_copy / "tok.json").symlink_to("tokenizer.json")
    assert cli("verify", built_copy).exit_code == 0


def test_manifest_path_outside_package_refused(built_copy, cli):
    def change(m):
        m["files"]["tokenizer.json"]["path"] = "../tokenizer.json"

    shutil.copyfile(built_copy / "tokenizer.json", built_copy.parent / "tokenizer.json")
    _edit_manifest(built_copy, change)
    lines = _fails(cli("verify", built_copy))
    assert lines == [
        "FAIL manifest.json: key files.tokenizer.json.path '../tokenizer.json' points outside the package; "
        "packages must be self-contained; rebuild the package with 'gpt2deploy build' (or 'gpt2deploy export')"
    ]
    r = cli("run", built_copy, "-p", "hi", "-n", "2")
    assert r.exit_code == 2 and "key files.tokenizer.json.path '../tokenizer.json' points outside" in r.stderr


@pytest.mark.parametrize("reader", ["onnx", "onnxruntime"])
def test_io_contract_mismatch(built_copy, reader):
    def change(m):
        m["io"]["inputs"][3]["shape"][3] = 99  # past_key_values.0.key head_dim
        m["io"]["outputs"][0]["name"] = "scores"
        m["io"]["inputs"][0]["dtype"] = "int32"

    _edit_manifest(built_copy, change)
    problems = verify_package(built_copy, reader=reader).problems
    for f in ("onnx/model.onnx", "onnx/model_int8.onnx", "onnx/model_q4.onnx"):
        mine = [p for p in problems if p.startswith(f + ":")]
        assert f"{f}: graph lacks output scores of the manifest's I/O contract" in mine
        assert f"{f}: graph output logits not in the manifest's I/O contract" in mine
        assert f"{f}: input input_ids has dtype int64, the manifest says int32" in mine
        assert any(p.startswith(f"{f}: input past_key_values.0.key has shape") and "99" in p for p in mine)
        assert len(mine) == 4, mine
    assert len(problems) == 12


def test_external_data_must_be_listed(built_copy, cli):
    import onnx

    from gpt2deploy.manifest import file_entry

    graph = built_copy / "onnx" / "model.onnx"
    model = onnx.load(str(graph))
    onnx.save_model(model, str(graph), save_as_external_data=True, location="weights.bin", size_threshold=1024)
    (built_copy / "onnx" / "model.onnx.data").unlink()
    _edit_manifest(
        built_copy, lambda m: m["variants"]["fp32"].__setitem__("files", [file_entry(built_copy, "onnx/model.onnx")])
    )
    _edit_manifest(
        built_copy, lambda m: m["variants"]["fp32"].__setitem__("size", m["variants"]["fp32"]["files"][0]["size"])
    )
    lines = _fails(cli("verify", built_copy))
    assert lines == [
        "FAIL onnx/model.onnx: graph needs external data onnx/weights.bin, which variant fp32 does not list; "
        "rebuild the package"
    ]
    _edit_manifest(
        built_copy, lambda m: m["variants"]["fp32"]["files"].append(file_entry(built_copy, "onnx/weights.bin"))
    )
    _edit_manifest(
        built_copy,
        lambda m: m["variants"]["fp32"].__setitem__("size", sum(f["size"] for f in m["variants"]["fp32"]["files"])),
    )
    assert cli("verify", built_copy).exit_code == 0


def test_malformed_variant_entry(built_copy, cli):
    _edit_manifest(built_copy, lambda m: m["variants"]["int8"].pop("files"))
    lines = _fails(cli("verify", built_copy))
    assert (
        "FAIL manifest.json: key variants.int8.files must be an array (got null); "
        "rebuild the package with 'gpt2deploy build' (or 'gpt2deploy export')"
    ) in lines
    assert (
        "FAIL onnx/model_int8.onnx: ONNX file not listed in the manifest; remove it or rebuild the package" not in lines
    )


# -- manifests that cannot be read: one line, nonzero exit, no traceback --------------------------


def test_malformed_json(built_copy, cli):
    (built_copy / "manifest.json").write_text('{"format": "gpt2deploy-package", ')
    _fails(cli("verify", built_copy), "manifest.json", "is not valid JSON", "re-create the package")
    r = cli("inspect", built_copy)
    assert (
        r.exit_code == 2
        and r.stderr.startswith("error: ")
        and "is not valid JSON" in r.stderr
        and "Traceback" not in r.output
    )
    with pytest.raises(PackageError, match="not valid JSON"):
        Package.open(built_copy)


@pytest.mark.parametrize(
    "version, needle",
    [
        (99, "schema_version 99, newer than this gpt2deploy"),
        (0, "unknown schema_version 0"),
        ("1", "unknown schema_version '1'"),
        (None, "unknown schema_version None"),
    ],
)
def test_unknown_schema_version_refused(built_copy, cli, version, needle):
    _edit_manifest(built_copy, lambda m: m.__setitem__("schema_version", version))
    fix = "upgrade gpt2deploy" if version == 99 else "re-create the package with 'gpt2deploy build'"
    _fails(cli("verify", built_copy), needle, fix)
    for args in (("inspect", built_copy), ("triton", built_copy, "-o", built_copy.parent / "repo")):
        r = cli(*args)
        assert r.exit_code == 2 and needle in r.stderr and fix in r.stderr and "Traceback" not in r.output
    assert not (built_copy.parent / "repo").exists()
    with pytest.raises(PackageError, match=needle):
        load_manifest(built_copy)


def test_package_path_is_a_file_or_missing(built_copy, tmp_path, cli):
    for cmd in ("verify", "inspect"):
        r = cli(cmd, built_copy / "manifest.json")
        assert (
            r.exit_code == 2
            and r.stderr
            == f"error: package path {built_copy / 'manifest.json'} is a file; pass the package directory\n"
        )
        r = cli(cmd, tmp_path / "nope")
        assert r.exit_code == 2 and "does not exist" in r.stderr and "Traceback" not in r.output
    (tmp_path / "empty").mkdir()
    r = cli("verify", tmp_path / "empty")
    assert r.exit_code == 2 and "not a gpt2deploy package (no manifest.json)" in r.stderr


# -- the runtime alone: no torch, no onnx ---------------------------------------------------------


def test_verify_and_load_without_torch_or_onnx(built_package, tmp_path):
    script = r"""
import sys
for name in ("torch", "transformers", "onnx", "onnxscript"):
    sys.modules[name] = None  # importing any of these now raises ImportError
from typer.testing import CliRunner
from gpt2deploy.cli import app
r = CliRunner().invoke(app, ["verify", sys.argv[1]])
assert r.exit_code == 0 and "(onnxruntime)" in r.stdout, r.output
print("VERIFY", r.stdout.strip())
import gpt2deploy
m = gpt2deploy.load(sys.argv[1])
text = m.generate("The assert statement", max_new_tokens=8)
assert isinstance(text, str) and text, text
print("GENERATED", m.variant, repr(text))
"""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]),
    }
    r = subprocess.run(
        [sys.executable, "-c", script, str(built_package)], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    from gpt2deploy.runtime.select import select_variant

    assert "VERIFY ok" in r.stdout
    assert f"GENERATED {select_variant(load_manifest(built_package), 'cpu')[0]} " in r.stdout
