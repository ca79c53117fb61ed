"""Build every model the harness compares from ONE checkpoint (created when missing).

* checkpoint: a seeded random GPT-2-small-shaped (124M) model from ``exporters.synthetic`` (speed does not
  depend on the weight values), or any local GPT-2 checkpoint passed with ``--checkpoint``;
* gpt2deploy package: ``gpt2deploy export`` then ``gpt2deploy quantize --mode int8|int4``;
* CTranslate2 int8 and float32 conversions (``TransformersConverter``).

Everything goes to benchmarks/.work/ (git-ignored) and is reused on the next run.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work"
TOKENIZER = ROOT.parent / "shared" / "gpt2-tokenizer"
FALLBACK_TOKENIZER = ROOT / "tests" / "assets" / "gpt2-tokenizer"


def _cli(*args: str, log: Path) -> tuple[bool, str]:
    """Run ``gpt2deploy ARGS`` with this interpreter; (ok, last line of output)."""
    cmd = [sys.executable, "-c", "from gpt2deploy.cli import main; main()", *args]
    with open(log, "a") as out:
        out.write("$ gpt2deploy " + " ".join(args) + "\n")
        out.flush()
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return code == 0, (lines[-1] if lines else "")


def default_checkpoint(say=print) -> Path:
    """benchmarks/.work/gpt2-small-random: GPT-2-small shape, seed 0 (created once)."""
    ckpt = WORK / "gpt2-small-random"
    if (ckpt / "config.json").is_file() and any(ckpt.glob("*.safetensors")):
        return ckpt
    tokenizer = TOKENIZER if (TOKENIZER / "tokenizer.json").is_file() else FALLBACK_TOKENIZER
    say(f"writing a random GPT-2-small-shaped checkpoint to {ckpt}")
    tmp = ckpt.with_name(ckpt.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.check_call(
        [sys.executable, "-m", "exporters.synthetic", str(tmp), "--tokenizer", str(tokenizer)], cwd=ROOT
    )
    tmp.rename(ckpt)
    return ckpt


def checkpoint_key(ckpt: Path) -> str:
    """Short key of a checkpoint (path, config and weight sizes/mtimes) naming its derived models."""
    h = hashlib.sha256(str(ckpt.resolve()).encode())
    for f in sorted(ckpt.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:10]


#: The code that writes a package's graphs: a change to it makes the harness build the package again.
GRAPH_CODE = (
    "exporters/*.py",
    "quant/*.py",
    "gpt2deploy/exporting.py",
    "gpt2deploy/quantiz*.py",
    "gpt2deploy/manifest.py",
)


def graph_code_key() -> str:
    """Short key of the source that writes graphs (``GRAPH_CODE``)."""
    h = hashlib.sha256()
    for pattern in GRAPH_CODE:
        for f in sorted(ROOT.glob(pattern)):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:6]


def package_dir(ckpt: Path) -> Path:
    """Where the harness keeps the gpt2deploy package of ``ckpt``, named by the checkpoint and the graph code."""
    return WORK / f"pkg-{checkpoint_key(ckpt)}-{graph_code_key()}"


def gpt2deploy_package(ckpt: Path, variants: list[str], say=print) -> tuple[Path | None, dict]:
    """Export + quantize. Returns (package, {variant: reason}) with a reason for each variant that failed."""
    from gpt2deploy.package import Package

    work = package_dir(ckpt)
    log = work.with_name(work.name + ".log")
    failed: dict[str, str] = {}
    if not (work / "manifest.json").is_file():
        say(f"exporting {ckpt} -> {work} (log {log})")
        ok, last = _cli("export", str(ckpt), "-o", str(work), "--force", log=log)
        if not ok:
            return None, {v: f"export failed: {last}" for v in variants}
    present = Package.open(work).variants
    for variant in variants:
        if variant in present:
            continue
        mode = {"int8": "int8", "int4": "int4", "fp16": "fp16"}.get(variant)
        if mode is None:
            failed[variant] = "not buildable by the harness"
            continue
        say(f"gpt2deploy quantize --mode {mode} (log {log})")
        ok, last = _cli("quantize", str(work), "--mode", mode, log=log)
        if not ok:
            failed[variant] = f"quantize failed: {last}"
    return work, failed


def ctranslate2_model(ckpt: Path, quantization: str, say=print) -> tuple[Path | None, str]:
    """CTranslate2 conversion of ``ckpt`` (``quantization``: int8 | float32); (path, "") or (None, reason)."""
    try:
        import ctranslate2  # noqa: F401
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        return None, "not available: ctranslate2 is not installed (pip install ctranslate2)"
    out = WORK / f"ct2-{checkpoint_key(ckpt)}-{quantization}"
    if (out / "model.bin").is_file():
        return out, ""
    say(f"converting {ckpt} to CTranslate2 {quantization} -> {out}")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        TransformersConverter(str(ckpt)).convert(str(tmp), quantization=quantization, force=True)
    except Exception as e:  # any converter failure makes this peer unavailable, not the harness
        shutil.rmtree(tmp, ignore_errors=True)
        return None, f"not available: conversion failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    tmp.rename(out)
    return out, ""


def forget_package(ckpt: Path, say=print) -> None:
    """Delete the gpt2deploy package built from ``ckpt`` so this run re-exports and re-quantizes it."""
    key = checkpoint_key(ckpt)
    for path in sorted(WORK.glob(f"pkg-{key}*")):
        say(f"removing {path}")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
