"""inspect: dims, variants, accuracy, libraries, generation defaults, and the variant auto-selection picks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt2deploy.manifest import load_manifest

ALL = ("fp32", "int8", "int4")


def _edit_manifest(root: Path, change) -> None:
    m = json.loads((root / "manifest.json").read_text())
    change(m)
    (root / "manifest.json").write_text(json.dumps(m, indent=2))


def test_inspect_json(built_package, cli):
    r = cli("inspect", built_package, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    m = load_manifest(built_package)
    assert info["schema_version"] == 1 and info["format"] == "gpt2deploy-package"
    assert info["model"]["n_layer"] == 2 and info["model"]["n_head"] == 4 and info["model"]["vocab_size"] == 50257
    assert list(info["variants"]) == list(ALL)
    for name, v in info["variants"].items():
        entry = m["variants"][name]
        assert (
            v["size"] == entry["size"] and v["precision"] == entry["precision"] and v["providers"] == entry["providers"]
        )
        assert v["libraries"]["onnxruntime"] and v["libraries"]["gpt2deploy"]
    assert info["variants"]["fp32"]["accuracy"] is None and info["variants"]["fp32"]["parity"]["passed"] is True
    for name in ALL[1:]:
        acc = info["variants"][name]["accuracy"]
        metrics = m["variants"][name]["accuracy"]["metrics"]
        assert (
            acc["passed"] is True
            and acc["ppl_delta"] == pytest.approx(metrics["ppl_delta"])
            and acc["top1"] == pytest.approx(metrics["top1"])
        )
        assert acc["reference"] == {"kind": "variant", "variant": "fp32"}
    assert info["generation"]["eos_token_id"] == 50256
    assert "onnxruntime" in info["libraries"] and "torch" in info["libraries"]
    assert (
        info["io"]["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"] and len(info["io"]["outputs"]) == 5
    )
    assert info["io"]["optional_inputs"] == ["logits_to_keep"]
    assert info["build"]["variants"] == list(ALL) and info["build"]["rejected"] == {}


def test_inspect_text(built_package, cli):
    r = cli("inspect", built_package)
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "2 layers, 4 heads x 16, hidden 64, vocab 50257, context 128" in out
    assert "+ 4 past tensors [+ logits_to_keep] -> logits" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in ALL}
    assert set(rows) == set(ALL)
    assert "onnx/model.onnx" in rows["fp32"] and "reference" in rows["fp32"]
    for name in ALL[1:]:
        assert " pass " in rows[name] and "%" in rows[name]
    assert "MatMul" not in out  # a summary, not a dump
    assert "generation eos_token_id=50256" in out and "libraries  gpt2deploy" in out
    assert "auto cpu" in out and "auto cuda" in out


def test_auto_selection_follows_the_manifest(built_copy, cli):
    """inspect shows, and load(variant=None) picks, what the manifest allows: a failed gate is skipped."""
    import gpt2deploy
    from gpt2deploy.runtime.select import select_variant

    def auto(root):
        info = json.loads(cli("inspect", root, "--json").stdout)
        return info["auto"]

    first, reason = select_variant(load_manifest(built_copy), "cpu")
    assert first in ALL
    a = auto(built_copy)
    assert a["cpu"]["variant"] == first and a["cpu"]["reason"] == reason
    model = gpt2deploy.load(built_copy, device="cpu")
    assert model.variant == first

    def fail_gate(m):
        m["variants"][first]["accuracy"]["passed"] = False

    _edit_manifest(built_copy, fail_gate)
    second, _ = select_variant(load_manifest(built_copy), "cpu")
    assert second != first and second in ALL
    a = auto(built_copy)
    assert a["cpu"]["variant"] == second and f"{first} failed its accuracy gate" in a["cpu"]["reason"]
    assert gpt2deploy.load(built_copy, device="cpu").variant == second
    text = cli("inspect", built_copy).stdout
    assert f"auto cpu   {second}" in text
    row = next(line for line in text.splitlines() if line.startswith(first + " "))
    assert "FAIL" in row
    # the CUDA choice is shown even on a machine without CUDA: these variants take the in-place KV cache
    # (GroupQueryAttention with a padding bias, which has no CUDA kernel), so none is usable there
    assert (
        a["cuda"]["variant"] is None and "not built for cuda" in a["cuda"]["reason"] and "fp16" in a["cuda"]["reason"]
    )


def test_inspect_shows_rejected_and_unshipped_reference(built_copy, cli):
    def change(m):
        m["build"]["rejected"] = {"int4": ["top1 0.5 < 0.8"]}
        m["build"]["reference_in_package"] = False
        del m["variants"]["int4"]

    _edit_manifest(built_copy, change)
    out = cli("inspect", built_copy).stdout
    assert "int4 was not packaged: top1 0.5 < 0.8" in out
    assert "accuracy measured against fp32, which is not shipped in this package" in out
