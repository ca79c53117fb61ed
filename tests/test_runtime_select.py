"""Variant auto-selection from the manifest, and explicit variants at load."""

from __future__ import annotations

import shutil
import warnings

import pytest

import gpt2deploy
from gpt2deploy.errors import VariantError
from gpt2deploy.manifest import variant_entry
from gpt2deploy.package import Package
from gpt2deploy.runtime.model import AccuracyWarning, PerformanceWarning
from gpt2deploy.runtime.select import select_variant

CPU, CUDA = ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _m(**variants):
    return {"variants": {k: dict(v) for k, v in variants.items()}}


def ok(providers=CPU, passed=None):
    e = {"providers": providers}
    if passed is not None:
        e["accuracy"] = {"passed": passed}
    return e


def test_cpu_prefers_int4_then_int8_then_fp32():
    assert select_variant(_m(fp32=ok(), int8=ok(), int4=ok(), fp16=ok(CUDA)), "cpu")[0] == "int4"
    assert select_variant(_m(fp32=ok(), int8=ok()), "cpu")[0] == "int8"
    name, reason = select_variant(_m(fp32=ok(), fp16=ok(CUDA)), "cpu")
    assert name == "fp32" and "auto on cpu" in reason


def test_cpu_skips_failed_gates_and_says_why():
    name, reason = select_variant(_m(fp32=ok(passed=True), int4=ok(passed=False), int8=ok(passed=True)), "cpu")
    assert name == "int8"
    assert "int4 failed its accuracy gate" in reason and "passed its accuracy gate" in reason


def test_cpu_never_picks_fp16():
    with pytest.raises(VariantError, match=r"present: fp16.*--variant fp16"):
        select_variant(_m(fp16=ok(CUDA)), "cpu")
    with pytest.raises(VariantError, match="int8 failed its accuracy gate"):
        select_variant(_m(int8=ok(passed=False), fp16=ok(CUDA)), "cpu")


def test_cuda_prefers_fp16_else_fp32():
    assert select_variant(_m(fp32=ok(CUDA), int8=ok(), fp16=ok(CUDA)), "cuda")[0] == "fp16"
    assert select_variant(_m(fp32=ok(CUDA), int8=ok(), fp16=ok(CUDA, passed=False)), "cuda")[0] == "fp32"
    assert select_variant(_m(fp32=ok(CUDA), int8=ok()), "cuda")[0] == "fp32"
    # an int8 variant built for the CPU provider only is not used on CUDA
    with pytest.raises(VariantError, match="int8 is not built for cuda"):
        select_variant(_m(int8=ok(CPU)), "cuda")


def _add_fake_variant(root, name, file, precision, **extra):
    """A variant entry whose graph is a copy of fp32 (same contract), enough to test selection."""
    shutil.copyfile(root / "onnx" / "model.onnx", root / file)
    entry = variant_entry(
        root, name, [file], precision=precision, opset=18, recipe={"test": True}, providers=CUDA, **extra
    )
    Package.open(root).update_manifest(lambda m: m["variants"].__setitem__(name, entry))


def test_load_auto_picks_manifest_choice(package_copy):
    _add_fake_variant(package_copy, "int8", "onnx/model_int8.onnx", "int8", accuracy={"passed": True})
    m = gpt2deploy.load(package_copy, device="cpu", threads=1)
    assert m.variant == "int8" and "int8 is the fastest CPU variant present" in m.selection_reason
    Package.open(package_copy).update_manifest(
        lambda mf: mf["variants"]["int8"].__setitem__("accuracy", {"passed": False})
    )
    m = gpt2deploy.load(package_copy, device="cpu", threads=1)
    assert m.variant == "fp32" and "int8 failed its accuracy gate" in m.selection_reason
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = gpt2deploy.load(package_copy, variant="int8", device="cpu", threads=1)
    assert m.variant == "int8" and m.selection_reason == "requested"
    assert any(issubclass(x.category, AccuracyWarning) for x in w) and m.notes


def test_explicit_fp16_on_cpu_is_allowed_with_a_warning(package_copy):
    _add_fake_variant(package_copy, "fp16", "onnx/model_fp16.onnx", "fp16")
    with pytest.warns(PerformanceWarning, match="slower than fp32"):
        m = gpt2deploy.load(package_copy, variant="fp16", device="cpu", threads=1)
    assert m.variant == "fp16" and m.generate("Hi", max_new_tokens=3)
    assert gpt2deploy.load(package_copy, device="cpu", threads=1).variant == "fp32"


def test_unknown_variant_lists_present(tiny_package):
    with pytest.raises(VariantError, match=r"variant 'int4' is not in package .*present: fp32"):
        gpt2deploy.load(tiny_package, variant="int4", device="cpu")
