"""`gpt2deploy quantize`: add an INT8, INT4 or FP16 variant to a package, built from its fp32 graph.

Pipeline: check the options (``quantize_options``) -> load fp32 -> check the decoder contract -> optimize
(fusions) -> quantize -> run it on sample text (finite logits, agreement with fp32) -> write beside the
package -> record in the manifest. Nothing is half-written: the graph is saved to a staging directory inside
the package and moved into place by ``fsutil.replace_files``, which restores the previous files on any
failure; the manifest is updated atomically. The note and summary are built in ``quantize_summary``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import PackageError, UsageError, VariantError
from .fsutil import check_writable_dir, replace_files, staging_dir
from .manifest import VARIANT_FILES, providers_for_graph, variant_entry
from .package import Package
from .quantize_options import INT8_PASS_OPTIONS, MODES, NBITS_PASS_OPTIONS, QuantizeOptions
from .quantize_summary import note_for, summary

Progress = Callable[[str], None]

__all__ = ["MODES", "QuantizeOptions", "quantize_package"]

PRECISION = {"int8": "int8", "int4": "int4", "fp16": "fp16"}
PROVIDERS = {
    "int8": ["CPUExecutionProvider"],
    "int4": ["CPUExecutionProvider", "CUDAExecutionProvider"],
    "fp16": ["CUDAExecutionProvider"],
}

#: Plain English used to run a new variant once before it is written (finite logits, top-1 agreement).
SAMPLE_TEXT = (
    "The library keeps a small catalogue of maps, letters and photographs from the harbour town. "
    "Each spring the volunteers sort the new boxes, write a short note for every item and scan the most "
    "fragile pages first. Visitors can ask for a copy at the front desk, and the staff will explain how "
    "the old shipping records were kept before the railway arrived in 1872."
)
SAMPLE_TOKENS = 64


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
    opts = QuantizeOptions.parse(mode, per_channel, block_size, exclude, **options)
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
    graph_dir = pkg.root / Path(VARIANT_FILES.get(name, "onnx/x")).parent
    for d in dict.fromkeys((pkg.root, graph_dir if graph_dir.is_dir() else pkg.root)):
        check_writable_dir(d, "quantize writes the new variant and updates the manifest")

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
        model, pkg.dims.n_head, pkg.dims.hidden_size, progress=progress, attention_op=opts.attention_op
    )
    timings["optimize"] = time.perf_counter() - t0
    fused = opt_report.fused
    progress("fused: " + (", ".join(f"{k} {v}" for k, v in fused.items()) or "nothing"))

    t0 = time.perf_counter()
    model, result, recipe = _quantize(model, opts, progress)
    timings["quantize"] = time.perf_counter() - t0

    dest = VARIANT_FILES[name]
    with staging_dir(pkg.root / Path(dest).parent, "quantize") as stage:
        t0 = time.perf_counter()
        progress(f"saving {dest}")
        from quant.mapped import save_mapped  # weights memory-mapped at run time, the tied table held once

        written = save_mapped(model, stage / Path(dest).name)
        del model
        timings["save"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        progress(f"running the {name} graph on sample text (prompt + one decode step)")
        check = _sample_check(pkg, written[0], fp32_path)
        timings["check"] = time.perf_counter() - t0
        files = [str(Path(dest).parent / p.name) for p in written]
        old_files = [e["path"] for e in pkg.variants.get(name, {}).get("files", [])]

        def record() -> dict:
            entry = _entry(pkg, name, files, recipe, fused, result.details, check, opt_report.kv_cache)
            pkg.update_manifest(lambda m: m["variants"].__setitem__(name, entry))
            return entry

        entry = replace_files(pkg.root, stage, written, files, old_files, record)
    return {"variant": name, "entry": entry, "summary": summary(pkg, name, entry, opt_report, result, check, timings)}


def _quantize(model, opts: QuantizeOptions, progress: Progress):
    """Run the mode's pass; return ``(model, PassResult, recipe)`` (the recipe is recorded in the manifest)."""
    block_size, exclude = opts.block_size, opts.exclude
    if opts.int8_blocks:
        from quant.nbits import DEFAULT_ACCURACY_LEVEL, quantize_nbits

        progress(
            f"quantizing to int8 MatMulNBits (symmetric blocks of {block_size}, accuracy_level "
            f"{DEFAULT_ACCURACY_LEVEL})"
        )
        model, result = quantize_nbits(model, bits=8, block_size=block_size, symmetric=True, exclude=exclude)
        recipe = {
            "mode": "int8",
            "granularity": "block",
            "per_channel": False,
            "block_size": block_size,
            "accuracy_level": DEFAULT_ACCURACY_LEVEL,
        }
    elif opts.mode == "int8":
        from quant.int8 import quantize_int8

        kw = opts.pass_options(INT8_PASS_OPTIONS)
        progress(
            f"quantizing to int8 ({'per-channel' if opts.per_channel else 'per-tensor'} weights, dynamic activations)"
        )
        model, result = quantize_int8(model, per_channel=opts.per_channel, exclude=exclude, workdir=None, **kw)
        recipe = {
            "mode": "int8",
            "granularity": opts.granularity,
            "per_channel": opts.per_channel,
            "block_size": None,
            "accuracy_level": None,
            "tied_lm_head": bool(result.head and result.head.shared_with_embedding),
        }
    elif opts.mode == "int4":
        from quant.nbits import DEFAULT_ACCURACY_LEVEL, DEFAULT_SYMMETRIC, quantize_nbits

        kw = opts.pass_options(NBITS_PASS_OPTIONS)
        level = kw.setdefault("accuracy_level", DEFAULT_ACCURACY_LEVEL)
        progress(f"quantizing to int{kw.get('bits', 4)} MatMulNBits (block {block_size}, accuracy_level {level})")
        model, result = quantize_nbits(model, block_size=block_size, exclude=exclude, **kw)
        recipe = {
            "mode": "int4",
            "per_channel": False,
            "block_size": block_size,
            "accuracy_level": level,
            "head_bits": result.head.bits,
            "head_block_size": result.head.block_size,
            "head_symmetric": result.head.symmetric,
            "symmetric": kw.get("symmetric", DEFAULT_SYMMETRIC),
        }
    else:
        from quant.fp16 import convert_fp16

        progress("converting to float16 (fp32 I/O, LayerNorm/Softmax kept in fp32)")
        model, result = convert_fp16(model, exclude=exclude)
        recipe = {"mode": "fp16", "per_channel": False, "block_size": None, "accuracy_level": None}
    recipe.update(
        excluded=result.excluded,
        quantized_matmuls=result.quantized_matmuls,
        skipped_matmuls=result.skipped_matmuls,
        float_weight_fraction=result.float_weight_fraction,
        attention=opts.attention,
    )
    return model, result, recipe


def _sample_ids(pkg: Package) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(pkg.tokenizer_path))
    ids = tok.encode(SAMPLE_TEXT).ids
    limit = min(SAMPLE_TOKENS, (pkg.dims.n_positions or SAMPLE_TOKENS) - 1)
    return [i for i in ids if i < pkg.dims.vocab_size][:limit]


def _sample_check(pkg: Package, graph: Path, fp32_path: Path) -> dict:
    """Run prompt + one decode step on CPU; Inf/NaN is an error; report agreement with fp32."""
    from quant.sample_check import sample_check

    d = pkg.dims
    return sample_check(graph, fp32_path, _sample_ids(pkg), d.n_layer, d.n_head, d.head_dim)


def _entry(pkg, name, files, recipe, fused, details, check, kv_cache="concat") -> dict:
    import onnx

    from quant.graph import opset

    header = onnx.load(str(pkg.root / files[0]), load_external_data=False)
    recipe = dict(
        recipe, fused=fused, source="fp32", source_sha256=pkg.variant("fp32")["files"][0]["sha256"], details=details
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
        note=note_for(name, PROVIDERS[name], providers, recipe.get("granularity")),
        kv_cache=kv_cache,
    )
