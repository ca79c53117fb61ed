"""gpt2deploy quantize on bad input: one line `error: ...`, exit != 0, nothing written, manifest unchanged."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from conftest import assert_cli_error


def _snapshot(pkg: Path) -> dict:
    return {str(p.relative_to(pkg)): p.read_bytes() for p in sorted(pkg.rglob("*")) if p.is_file()}


def _assert_clean_failure(result, pkg: Path, before: dict, *words: str) -> None:
    assert_cli_error(result, *words, code=None, before="[quantize")  # only progress before it
    assert _snapshot(pkg) == before, "the package changed"


def test_unknown_mode(cli, package_copy):
    before = _snapshot(package_copy)
    r = cli("quantize", package_copy, "--mode", "int3")
    _assert_clean_failure(r, package_copy, before, "int3", "int8")


@pytest.mark.parametrize("block", ["24", "8", "0", "-32"])
def test_bad_block_size(cli, package_copy, block):
    before = _snapshot(package_copy)
    r = cli("quantize", package_copy, "--mode", "int4", "--block-size", block)
    _assert_clean_failure(r, package_copy, before, "power of two", "--block-size")


def test_per_channel_is_int8_only(cli, package_copy):
    before = _snapshot(package_copy)
    r = cli("quantize", package_copy, "--mode", "int4", "--per-channel")
    _assert_clean_failure(r, package_copy, before, "--per-channel")


def test_not_a_package(cli, tmp_path):
    r = cli("quantize", tmp_path / "nowhere", "--mode", "int8")
    assert r.exit_code != 0 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "nowhere").exists()


def test_package_without_fp32(cli, package_copy):
    manifest = json.loads((package_copy / "manifest.json").read_text())
    manifest["variants"]["int4x"] = manifest["variants"].pop("fp32")
    (package_copy / "manifest.json").write_text(json.dumps(manifest))
    before = _snapshot(package_copy)
    r = cli("quantize", package_copy, "--mode", "int8")
    _assert_clean_failure(r, package_copy, before, "fp32", "export")


def test_graph_that_is_not_a_decoder(cli, package_copy):
    """An fp32 'variant' whose graph lacks the past/present contract (a plain logits model)."""
    import onnx
    from onnx import TensorProto, helper

    from gpt2deploy.fsutil import sha256_file

    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 4])
    emb = helper.make_tensor("emb", TensorProto.FLOAT, [10, 4], [0.1] * 40)
    graph = helper.make_graph([helper.make_node("Gather", ["emb", "input_ids"], ["logits"])], "g", [x], [y], [emb])
    path = package_copy / "onnx" / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    manifest = json.loads((package_copy / "manifest.json").read_text())
    entry = manifest["variants"]["fp32"]
    entry["files"][0].update(sha256=sha256_file(path), size=path.stat().st_size)
    entry["size"] = path.stat().st_size
    (package_copy / "manifest.json").write_text(json.dumps(manifest))
    before = _snapshot(package_copy)
    r = cli("quantize", package_copy, "--mode", "int4")
    _assert_clean_failure(r, package_copy, before, "decoder", "gpt2deploy export")


def test_modified_fp32_graph(cli, package_copy):
    path = package_copy / "onnx" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    before = _snapshot(package_copy)
    r = cli("quantize", package_copy, "--mode", "int8")
    _assert_clean_failure(r, package_copy, before, "integrity")


def test_unknown_exclude(cli, package_copy):
    before = _snapshot(package_copy)
    r = cli("quantize", package_copy, "--mode", "int8", "--exclude", "no.such.weight")
    _assert_clean_failure(r, package_copy, before, "--exclude", "no.such.weight")


def test_disk_full_while_writing(cli, package_copy, monkeypatch):
    """The save fails half-way (ENOSPC): no variant file, no staging directory, manifest unchanged."""
    import quant.graph
    import quant.mapped

    def full_disk(model, path, **kwargs):
        Path(path).write_bytes(b"\0" * 1000)  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(quant.graph, "save", full_disk)
    monkeypatch.setattr(quant.mapped, "save_mapped", full_disk)
    before = _snapshot(package_copy)
    r = cli("quantize", package_copy, "--mode", "int8")
    _assert_clean_failure(r, package_copy, before, "No space left on device")
    assert not list(package_copy.glob("onnx/.quantize.*"))


def test_failure_while_recording_restores_the_previous_variant(package_copy, monkeypatch):
    """--force replacing int4, interrupted while the manifest is written: the old int4 files come back."""
    from gpt2deploy.package import Package
    from gpt2deploy.quantizing import quantize_package

    quantize_package(package_copy, "int4")
    before = _snapshot(package_copy)

    def interrupted(self, change):
        raise KeyboardInterrupt

    monkeypatch.setattr(Package, "update_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_package(package_copy, "int4", block_size=16, force=True)
    assert _snapshot(package_copy) == before
    assert Package.open(package_copy).integrity_problems() == []


def test_failure_while_recording_a_new_variant_leaves_nothing(package_copy, monkeypatch):
    from gpt2deploy.package import Package
    from gpt2deploy.quantizing import quantize_package

    before = _snapshot(package_copy)
    monkeypatch.setattr(
        Package,
        "update_manifest",
        lambda self, change: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")),
    )
    with pytest.raises(OSError):
        quantize_package(package_copy, "fp16")
    assert _snapshot(package_copy) == before


@pytest.mark.parametrize("args", [["--mode", "int4", "--head-bits", "6"], ["--mode", "int8", "--head-bits", "8"]])
def test_bad_head_bits(cli, package_copy, args):
    before = _snapshot(package_copy)
    r = cli("quantize", package_copy, *args)
    _assert_clean_failure(r, package_copy, before, "--head-bits")


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_killed_runs_are_swept(cli, package_copy):
    """A run killed outright (SIGKILL) cannot clean up; the next run removes its staging, and only its."""
    import os

    from gpt2deploy.fsutil import _host

    onnx_dir, dead, host = package_copy / "onnx", _dead_pid(), _host()
    stale = onnx_dir / f".quantize.{host}.{dead}.k1ll3d.partial"
    stale.mkdir()
    (stale / "model_int8.onnx.data").write_bytes(b"\0" * 4096)
    backups = onnx_dir / f".quantize.{host}.{dead}.b4ckup.partial"  # a killed commit's backups: kept for recovery
    backups.mkdir()
    (backups / "previous-model_int8.onnx").write_bytes(b"x")
    running = onnx_dir / f".quantize.{host}.{os.getpid()}.l1ve.partial"  # a run still going
    running.mkdir()
    elsewhere = onnx_dir / f".quantize.other-host.{dead}.r3mote.partial"  # another machine's, on a shared disk
    elsewhere.mkdir()
    r = cli("quantize", package_copy, "--mode", "int8")
    assert r.exit_code == 0, r.output
    assert not stale.exists()
    assert backups.exists() and running.exists() and elsewhere.exists()


def test_staged_outputs_sweep_killed_stages(tmp_path):
    from gpt2deploy.fsutil import _host, staged_dir, staged_file

    dead, host = _dead_pid(), _host()
    stale_dir = tmp_path / f".pkg.{host}.{dead}.abc123.partial"
    stale_dir.mkdir()
    (stale_dir / "manifest.json").write_text("{}")
    stale_file = tmp_path / f".plot.png.{host}.{dead}.def456.partial"
    stale_file.write_bytes(b"half")
    other = tmp_path / f".other.{host}.{dead}.ghi789.partial"  # another output's: not this one's to sweep
    other.mkdir()
    with staged_dir(tmp_path / "pkg") as tmp:
        (tmp / "manifest.json").write_text("{}")
    with staged_file(tmp_path / "plot.png") as tmp:
        tmp.write_bytes(b"png")
    assert not stale_dir.exists() and not stale_file.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "pkg", "plot.png"]
