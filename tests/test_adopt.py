"""`gpt2deploy adopt`: a real Optimum export of a tiny GPT-2 -> package -> quantize -> check -> run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BUILD_TOKENS, RANDOM_MODEL_GATES
from runtime_envs import CACHE, ROOT

import gpt2deploy


@pytest.fixture(scope="session")
def optimum_python() -> Path:
    sys.path.insert(0, str(ROOT))
    from benchmarks.envs import OPTIMUM_REQUIREMENTS, ensure_venv

    py, why = ensure_venv(CACHE / "optimum-venv", OPTIMUM_REQUIREMENTS, CACHE / "optimum-venv.log")
    if py is None:
        pytest.fail(f"cannot create the Optimum environment: {why}")
    return py


def _export(python: Path, ckpt: Path, out: Path, task: str) -> Path:
    env = {**os.environ, "PYTHONPATH": ""}
    cmd = [str(python), str(ROOT / "tests" / "optimum_export.py"), str(ckpt), str(out), task]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def optimum_folder(tmp_path_factory, tiny_checkpoint, optimum_python) -> Path:
    return _export(
        optimum_python, tiny_checkpoint, tmp_path_factory.mktemp("optimum") / "out", "text-generation-with-past"
    )


@pytest.fixture
def folder_copy(tmp_path, optimum_folder) -> Path:
    dst = tmp_path / "export"
    shutil.copytree(optimum_folder, dst)
    return dst


@pytest.mark.timeout(1200)
def test_adopt_round_trip(optimum_folder, tiny_checkpoint, tmp_path, cli):
    pkg = tmp_path / "pkg"
    r = cli("adopt", optimum_folder, "-o", pkg, "--reference", tiny_checkpoint)
    assert r.exit_code == 0, r.output
    assert "parity with" in r.output
    m = json.loads((pkg / "manifest.json").read_text())
    fp32 = m["variants"]["fp32"]
    assert fp32["parity"]["passed"] and fp32["requires"] == {"onnxruntime": "1.22"}
    assert fp32["recipe"]["exporter"] == "optimum"
    assert cli("verify", pkg).exit_code == 0
    r = cli("quantize", pkg, "--mode", "int8")
    assert r.exit_code == 0, r.output
    r = cli("check", pkg, "--max-tokens", BUILD_TOKENS, *[f"--threshold={t}" for t in RANDOM_MODEL_GATES])
    assert r.exit_code == 0, r.output
    model = gpt2deploy.load(pkg, device="cpu")
    assert model.variant == "int8"
    out = model.generate("The quick brown fox", max_new_tokens=4, do_sample=False)
    assert isinstance(out, str) and out
    fp32_model = gpt2deploy.load(pkg, variant="fp32", device="cpu")
    tokens = fp32_model.generate_ids([[464, 2068, 7586]], max_new_tokens=6, do_sample=False, ignore_eos=True).tokens
    # the adopted graph gives the tokens of gpt2deploy's own export of the same checkpoint
    from gpt2deploy.exporting import export_package

    own = export_package(str(tiny_checkpoint), tmp_path / "own").path
    mine = gpt2deploy.load(own, variant="fp32").generate_ids([[464, 2068, 7586]], max_new_tokens=6, ignore_eos=True)
    assert tokens == mine.tokens


@pytest.mark.timeout(1200)
def test_adopt_without_past(tiny_checkpoint, optimum_python, tmp_path, cli):
    folder = _export(optimum_python, tiny_checkpoint, tmp_path / "nopast", "text-generation")
    r = cli("adopt", folder, "-o", tmp_path / "pkg")
    assert r.exit_code == 2 and "without the KV cache" in r.output and "text-generation-with-past" in r.output
    assert not (tmp_path / "pkg").exists()


def _bad(cli, folder, tmp_path, *fragments):
    out = tmp_path / "pkg"
    r = cli("adopt", folder, "-o", out)
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert line.startswith("error: ") and "\n" not in line and "Traceback" not in line, line
    for f in fragments:
        assert f in line, line
    assert not out.exists()
    assert not any(p.name.startswith(".pkg") for p in tmp_path.iterdir())


@pytest.mark.timeout(600)
def test_adopt_other_architecture(folder_copy, tmp_path, cli):
    cfg = json.loads((folder_copy / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder_copy / "config.json").write_text(json.dumps(cfg))
    _bad(cli, folder_copy, tmp_path, "llama export, not GPT-2")


@pytest.mark.timeout(600)
def test_adopt_missing_tokenizer(folder_copy, tmp_path, cli):
    (folder_copy / "tokenizer.json").unlink()
    _bad(cli, folder_copy, tmp_path, "no tokenizer.json")


@pytest.mark.timeout(600)
def test_adopt_mismatched_tokenizer(folder_copy, tmp_path, cli):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder_copy / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(64)])
    tok.save(str(folder_copy / "tokenizer.json"))
    _bad(cli, folder_copy, tmp_path, "belongs to another model")


@pytest.mark.timeout(600)
def test_adopt_missing_external_data(folder_copy, tmp_path, cli):
    import onnx

    model = onnx.load(str(folder_copy / "model.onnx"))
    onnx.save_model(model, str(folder_copy / "model.onnx"), save_as_external_data=True, location="model.onnx_data")
    (folder_copy / "model.onnx_data").unlink()
    _bad(cli, folder_copy, tmp_path, "model.onnx_data, which is missing")


@pytest.mark.timeout(600)
def test_adopt_with_external_data(folder_copy, tmp_path, cli):
    import onnx

    model = onnx.load(str(folder_copy / "model.onnx"))
    onnx.save_model(model, str(folder_copy / "model.onnx"), save_as_external_data=True, location="model.onnx_data")
    r = cli("adopt", folder_copy, "-o", tmp_path / "pkg")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "pkg" / "onnx" / "model.onnx_data").is_file()
    assert cli("verify", tmp_path / "pkg").exit_code == 0


@pytest.mark.timeout(600)
def test_adopt_config_from_another_model(folder_copy, tmp_path, cli):
    cfg = json.loads((folder_copy / "config.json").read_text())
    cfg["n_layer"] += 1
    (folder_copy / "config.json").write_text(json.dumps(cfg))
    _bad(cli, folder_copy, tmp_path, "come from different models")


def test_adopt_not_a_folder(tmp_path, cli):
    _bad(cli, tmp_path / "missing", tmp_path, "is not a directory")
    (tmp_path / "empty").mkdir()
    _bad(cli, tmp_path / "empty", tmp_path, "has no model.onnx")
