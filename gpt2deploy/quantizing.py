"""`gpt2deploy quantize`: add an INT8, INT4 or FP16 variant to a package, built from its fp32 graph.

Pipeline: load fp32 -> check the decoder contract -> optimize (fusions) -> quantize -> run it on sample
text (finite logits, agreement with fp32) -> write beside the package -> record in the manifest.
Nothing is half-written: the graph is saved to a temporary directory inside the package, renamed into
place, and the manifest is updated atomically; any failure restores the previous files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import PackageError, UsageError, VariantError
from .fsutil import stage_prefix, sweep_stale_stages
from .manifest import VARIANT_FILES, providers_for_graph
from .package import Package

Progress = Callable[[str], None]

MODES = ("int8", "int4", "fp16")
PRECISION = {"int8": "int8", "int4": "int4", "fp16": "fp16"}
PROVIDERS = {
    "int8": ["CPUExecutionProvider"],
    "int4": ["CPUExecutionProvider", "CUDAExecutionProvider"],
    "fp16": ["CUDAExecutionProvider"],
}
#: The attention op each mode's graph gets by default ("gqa" or "mha", option ``attention``).
#: GroupQueryAttention takes an in-place KV buffer and is the fastest on CPU, but ONNX Runtime's CUDA
#: kernel rejects the padding-mask bias it is given, so it makes a CPU-only variant; MultiHeadAttention
#: runs on both. The CUDA fp16 variant therefore uses MHA; ``attention="mha"`` makes a CUDA-capable int4.
ATTENTION = {"int8": "gqa", "int4": "gqa", "fp16": "mha"}
ATTENTION_OPS = {"gqa": "GroupQueryAttention", "mha": "MultiHeadAttention"}
NOTES = {
    "int8": "CPU variant: int8 weights, uint8 activations quantized per call (DynamicQuantizeMatMul)",
    "int4": (
        "CPU and CUDA variant: 4-bit block weights (MatMulNBits, lm_head/embedding table in recipe.head_bits), float "
        "activations"
    ),
    "fp16": (
        "CUDA variant: on the CPU execution provider float16 is slower than fp32; 'run'/'auto' pick it only on CUDA"
    ),
}

#: Plain English used to run a new variant once before it is written (finite logits, top-1 agreement).
SAMPLE_TEXT = (
    "The library keeps a small catalogue of maps, letters and photographs from the harbour town. "
    "Each spring the volunteers sort the new boxes, write a short note for every item and scan the most "
    "fragile pages first. Visitors can ask for a copy at the front desk, and the staff will explain how "
    "the old shipping records were kept before the railway arrived in 1872."
)
SAMPLE_TOKENS = 64
#: int8 weight granularities: per tensor and per channel (DynamicQuantizeMatMul), or 8-bit MatMulNBits blocks.
GRANULARITIES = ("tensor", "channel", "block")
OPTIONS = {
    "granularity",
    "attention",
    "accuracy_level",
    "bits",
    "head_bits",
    "head_block_size",
    "head_symmetric",
    "embedding",
    "share_embedding",
    "quantize_embedding",
    "reduce_range",
    "symmetric",
}


def quantize_package(
    path: str | os.PathLike,
    mode: str,
    per_channel: bool = False,
    block_size: int | None = None,
    exclude: Iterable[str] = (),
    force: bool = False,
    progress: Progress = lambda msg: None,
    **options,
) -> dict:
    """Quantize ``path``'s fp32 variant to ``mode`` and record it; return {"variant", "entry", "summary"}.

    ``options`` pass through to the mode's pass: int8 ``granularity`` ("tensor", the default; "channel",
    the same as ``per_channel``; "block": 8-bit MatMulNBits weight blocks of ``block_size``, default 128),
    ``share_embedding``, ``quantize_embedding``, ``reduce_range``; int4 ``accuracy_level``, ``bits``,
    ``head_bits``, ``embedding``, ``symmetric``. ``block_size`` defaults to 32 for int4.
    """
    from quant.int4 import DEFAULT_BLOCK_SIZE, check_block_size
    from quant.tied_int8 import INT8_BLOCK_SIZE

    if mode not in MODES:
        raise UsageError(f"unknown mode '{mode}'; choose one of {', '.join(MODES)}")
    from quant.errors import QuantError

    granularity = options.pop("granularity", None)
    if granularity is not None and mode != "int8":
        raise UsageError(f"--granularity applies to int8 only; drop it for {mode}")
    if mode == "int8":
        if granularity not in (None, *GRANULARITIES):
            raise UsageError(f"unknown granularity '{granularity}'; choose one of {', '.join(GRANULARITIES)}")
        if per_channel and granularity not in (None, "channel"):
            raise UsageError(f"--per-channel and --granularity {granularity} disagree; pass one of them")
        granularity = granularity or ("channel" if per_channel else "tensor")
        per_channel = granularity == "channel"
        if block_size is not None and granularity != "block":
            raise UsageError("--block-size applies to int8 only with --granularity block; drop it or add that")
        options["granularity"] = granularity
    if block_size is None:
        block_size = INT8_BLOCK_SIZE if granularity == "block" else DEFAULT_BLOCK_SIZE
    try:
        check_block_size(block_size)
    except QuantError as e:
        raise UsageError(str(e)) from None
    if per_channel and mode != "int8":
        raise UsageError(f"--per-channel applies to int8 only; drop it for {mode}")
    if "head_bits" in options and mode != "int4":
        raise UsageError(f"--head-bits applies to int4 only; drop it for {mode}")
    if options.get("head_bits", 4) not in (4, 8):
        raise UsageError(f"--head-bits must be 4 or 8 (got {options['head_bits']})")
    attention = options.pop("attention", None) or ATTENTION.get(mode, "gqa")
    if attention not in ATTENTION_OPS:
        raise UsageError(f"unknown attention '{attention}'; choose gqa (CPU, in-place KV cache) or mha (CPU and CUDA)")
    unknown = set(options) - OPTIONS
    if unknown:
        raise UsageError(
            f"unknown quantize option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(OPTIONS))}"
        )
    exclude = [e.strip() for e in (exclude or ()) if e and e.strip()]
    pkg = Package.open(path)
    if "fp32" not in pkg.variants:
        raise VariantError(
            f"package {pkg.root} has no fp32 variant to quantize from; re-export it with 'gpt2deploy export MODEL -o "
            f"{pkg.root} --force'"
        )
    name = mode
    if name in pkg.variants and not force:
        raise UsageError(f"variant '{name}' already exists in {pkg.root}; pass --force to replace it")
    problems = pkg.integrity_problems(["fp32"])
    if problems:
        raise PackageError(
            f"the fp32 variant of {pkg.root} fails its integrity check ({problems[0]}); re-export the package"
        )

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    fp32_path = pkg.variant_path("fp32")
    progress(f"loading {fp32_path.relative_to(pkg.root)} ({pkg.variant('fp32')['size'] / 1e6:.1f} MB)")
    import quant.graph as qgraph
    from quant.optimize import optimize

    model = qgraph.load(fp32_path)
    qgraph.check_decoder(model, pkg.dims.n_layer)
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model, opt_report = optimize(
        model, pkg.dims.n_head, pkg.dims.hidden_size, progress=progress, attention_op=ATTENTION_OPS[attention]
    )
    timings["optimize"] = time.perf_counter() - t0
    fused = opt_report["fused"]
    progress("fused: " + (", ".join(f"{k} {v}" for k, v in fused.items()) or "nothing"))

    t0 = time.perf_counter()
    model, info, recipe = _quantize(model, mode, per_channel, block_size, exclude, options, progress)
    recipe["attention"] = attention
    timings["quantize"] = time.perf_counter() - t0

    dest = VARIANT_FILES[name]
    with _staging(pkg.root / Path(dest).parent) as stage:
        t0 = time.perf_counter()
        progress(f"saving {dest}")
        from quant.mapped import save_mapped  # weights memory-mapped at run time, the tied table held once

        written = save_mapped(model, stage / Path(dest).name)
        del model
        timings["save"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        progress(f"running the {name} graph on sample text (prompt + one decode step)")
        check = _sample_check(pkg, written[0], fp32_path, name)
        timings["check"] = time.perf_counter() - t0
        files = [str(Path(dest).parent / p.name) for p in written]
        kv_cache = opt_report["kv_cache"]
        entry = _commit(
            pkg,
            name,
            stage,
            written,
            files,
            recipe_for=lambda: _entry(pkg, name, files, recipe, fused, info, check, kv_cache),
        )
    summary = _summary(pkg, name, entry, opt_report, info, check, timings)
    return {"variant": name, "entry": entry, "summary": summary}


def _quantize(model, mode, per_channel, block_size, exclude, options, progress):
    if mode == "int8" and options.get("granularity") == "block":
        from quant.int4 import DEFAULT_ACCURACY_LEVEL, quantize_int4

        progress(
            f"quantizing to int8 MatMulNBits (symmetric blocks of {block_size}, accuracy_level "
            f"{DEFAULT_ACCURACY_LEVEL})"
        )
        model, info = quantize_int4(model, block_size=block_size, bits=8, symmetric=True, exclude=exclude)
        info["mode"] = "int8"
        recipe = {
            "mode": "int8",
            "granularity": "block",
            "per_channel": False,
            "block_size": block_size,
            "accuracy_level": DEFAULT_ACCURACY_LEVEL,
        }
    elif mode == "int8":
        from quant.int8 import quantize_int8

        kw = {k: options[k] for k in ("reduce_range", "share_embedding", "quantize_embedding") if k in options}
        progress(f"quantizing to int8 ({'per-channel' if per_channel else 'per-tensor'} weights, dynamic activations)")
        model, info = quantize_int8(model, per_channel=per_channel, exclude=exclude, workdir=None, **kw)
        recipe = {
            "mode": "int8",
            "granularity": options["granularity"],
            "per_channel": per_channel,
            "block_size": None,
            "accuracy_level": None,
        }
    elif mode == "int4":
        from quant.int4 import DEFAULT_ACCURACY_LEVEL, quantize_int4

        kw = {
            k: options[k]
            for k in (
                "accuracy_level",
                "bits",
                "head_bits",
                "head_block_size",
                "head_symmetric",
                "embedding",
                "symmetric",
            )
            if k in options
        }
        level = kw.setdefault("accuracy_level", DEFAULT_ACCURACY_LEVEL)
        progress(f"quantizing to int{kw.get('bits', 4)} MatMulNBits (block {block_size}, accuracy_level {level})")
        model, info = quantize_int4(model, block_size=block_size, exclude=exclude, **kw)
        recipe = {
            "mode": "int4",
            "per_channel": False,
            "block_size": block_size,
            "accuracy_level": level,
            "head_bits": info["head_bits"],
            "head_block_size": info["head_block_size"],
            "head_symmetric": info["head_symmetric"],
        }
    else:
        from quant.fp16 import convert_fp16

        progress("converting to float16 (fp32 I/O, LayerNorm/Softmax kept in fp32)")
        model, info = convert_fp16(model, exclude=exclude)
        recipe = {"mode": "fp16", "per_channel": False, "block_size": None, "accuracy_level": None}
    recipe.update(
        excluded=info.get("excluded", []),
        quantized_matmuls=info.get("quantized_matmuls", 0),
        skipped_matmuls=info.get("skipped_matmuls", 0),
        float_weight_fraction=info.get("float_weight_fraction"),
    )
    return model, info, recipe


def _sample_ids(pkg: Package) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(pkg.tokenizer_path))
    ids = tok.encode(SAMPLE_TEXT).ids
    limit = min(SAMPLE_TOKENS, (pkg.dims.n_positions or SAMPLE_TOKENS) - 1)
    return [i for i in ids if i < pkg.dims.vocab_size][:limit]


def _sample_check(pkg: Package, graph: Path, fp32_path: Path, name: str) -> dict:
    """Run prompt + one decode step on CPU; Inf/NaN is an error; report agreement with fp32."""
    import numpy as np

    from quant.fp16 import check_finite, run_logits

    d = pkg.dims
    ids = _sample_ids(pkg)
    result = check_finite(graph, ids, d.n_layer, d.n_head, d.head_dim)
    ref = run_logits(fp32_path, ids, d.n_layer, d.n_head, d.head_dim)
    new = run_logits(graph, ids, d.n_layer, d.n_head, d.head_dim)
    agree = float(
        np.mean(np.concatenate([(a.argmax(-1) == b.argmax(-1)).ravel() for a, b in zip(ref, new, strict=False)]))
    )
    result.update(
        provider="CPUExecutionProvider",
        max_abs_logit_diff=float(max(np.abs(a - b).max() for a, b in zip(ref, new, strict=False))),
        top1_agreement=round(agree, 4),
    )
    return result


def note_for(name: str, providers: list[str], granularity: str | None = None) -> str:
    if name == "int8" and granularity == "block":
        return (
            "CPU variant: int8 weights in symmetric blocks (MatMulNBits), activations quantized to int8 per block at "
            "run time"
        )
    if "CUDAExecutionProvider" in PROVIDERS[name] and "CUDAExecutionProvider" not in providers:
        return NOTES[name].replace(
            "CPU and CUDA variant", "CPU variant (in-place KV cache; quantize with --attention mha for CUDA)"
        )
    return NOTES[name]


def _entry(pkg, name, files, recipe, fused, info, check, kv_cache="concat") -> dict:
    import onnx

    from quant.graph import opset

    from .exporting import variant_entry

    header = onnx.load(str(pkg.root / files[0]), load_external_data=False)
    recipe = dict(
        recipe, fused=fused, source="fp32", source_sha256=pkg.variant("fp32")["files"][0]["sha256"], details=info
    )
    providers = providers_for_graph(PROVIDERS[name], fused)
    return variant_entry(
        pkg.root,
        name,
        files,
        precision=PRECISION[name],
        opset=opset(header),
        recipe=recipe,
        providers=providers,
        sample_check=check,
        note=note_for(name, providers, recipe.get("granularity")),
        kv_cache=kv_cache,
    )


@contextlib.contextmanager
def _staging(parent: Path):
    """A temporary directory inside the package (same filesystem, so the final renames are atomic)."""
    parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_stages(parent, "quantize")  # what a killed run left behind
    tmp = Path(tempfile.mkdtemp(prefix=stage_prefix("quantize"), suffix=".partial", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _commit(pkg: Package, name: str, stage: Path, written: list[Path], files: list[str], recipe_for) -> dict:
    """Move the staged files into place and record the variant; on any failure restore what was there."""
    old_files = [e["path"] for e in pkg.variants.get(name, {}).get("files", [])]
    targets = {pkg.root / f for f in files} | {pkg.root / f for f in old_files}
    backups: dict[Path, Path] = {}
    moved: list[Path] = []
    try:
        for target in targets:
            if target.exists():
                backup = stage / f"previous-{target.name}"
                os.replace(target, backup)
                backups[target] = backup
        for src, rel in zip(written, files, strict=False):
            os.replace(src, pkg.root / rel)
            moved.append(pkg.root / rel)
        entry = recipe_for()
        pkg.update_manifest(lambda m: m["variants"].__setitem__(name, entry))
        return entry
    except BaseException:
        for path in moved:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for target, backup in backups.items():
            os.replace(backup, target)
        raise


def _head_note(name: str, info: dict) -> str | None:
    tied = (info.get("tied_embedding") or {}).get("shared")
    if name == "int8":
        block = (info.get("tied_embedding") or {}).get("block_size") or info.get("block_size")
        return (
            f"int8 blocks of {block} (MatMulNBits), shared with the embedding lookup"
            if tied
            else "int8, untied from the embedding"
        )
    if name == "int4":
        bits = info.get("head_bits", info.get("bits"))
        block = info.get("head_block_size") or info.get("block_size")
        kind = "symmetric " if info.get("head_symmetric") else ""
        return f"{bits}-bit {kind}blocks of {block}" + (", shared with the embedding lookup" if tied else "")
    return None


def _isa_note(name: str, info: dict) -> str | None:
    if name != "int8" or info.get("cpu_vnni") is not False or info.get("reduce_range"):
        return None
    return (
        "this CPU has no VNNI: u8 x s8 int8 products use saturating 16-bit pairs; if accuracy drops, "
        "quantize with reduce_range=True (7-bit weights); VNNI CPUs and ARM need no change"
    )


def _summary(pkg, name, entry, opt_report, info, check, timings) -> dict:
    fp32_size = pkg.variant("fp32")["size"]
    return {
        "variant": name,
        "file": entry["file"],
        "size_before": fp32_size,
        "size_after": entry["size"],
        "size_ratio": round(entry["size"] / fp32_size, 4) if fp32_size else None,
        "fused": opt_report["fused"],
        "kv_cache": opt_report["kv_cache"],
        "quantized_matmuls": info.get("quantized_matmuls", 0),
        "skipped_matmuls": info.get("skipped_matmuls", 0),
        "excluded": info.get("excluded", []),
        "float_weight_fraction": info.get("float_weight_fraction"),
        "sample_check": check,
        "providers": entry["providers"],
        "note": entry["note"],
        "isa_note": _isa_note(name, info),
        "lm_head": _head_note(name, info),
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }
