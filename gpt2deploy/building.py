"""`gpt2deploy build`: checkpoint -> export -> quantize -> check -> one package, written in a single rename.

Every stage works on a staged directory beside the output; the package appears only when all stages are
done. A variant that fails its accuracy gate is dropped from the package (its files and manifest entry)
unless ``allow_regression``, which keeps it with ``accuracy.passed = false`` so automatic variant selection
skips it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RegressionError, UsageError
from .fsutil import check_output_dir, staged_dir
from .manifest import VARIANT_FILES, load_manifest, save_manifest

Progress = Callable[[str], None]

#: What ``build`` makes when no variants are named. FP16 is a CUDA variant (slower than fp32 on the CPU
#: execution provider), so it is built only when asked for.
DEFAULT_VARIANTS = ("fp32", "int8", "int4")
REFERENCE = "fp32"


@dataclass
class BuildResult:
    path: Path
    manifest: dict
    variants: list[str]  # variants in the package
    rejected: dict[str, list[str]]  # variant -> why it failed its gate (dropped unless allow_regression)
    rows: list[dict]  # summary table rows, one per requested variant
    report: dict | None  # the accuracy report (None when only fp32 was built)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def regressed(self) -> list[str]:
        return sorted(self.rejected, key=_order)


def parse_variants(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"fp32,int8"`` or an iterable -> known variant names in canonical order, without duplicates."""
    if spec is None:
        return DEFAULT_VARIANTS
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if not names:
        raise UsageError(f"no variants given; pass e.g. --variants {','.join(DEFAULT_VARIANTS)}")
    unknown = [n for n in names if n not in VARIANT_FILES]
    if unknown:
        raise UsageError(f"unknown variant '{unknown[0]}' in --variants; choose from {', '.join(VARIANT_FILES)}")
    return tuple(n for n in VARIANT_FILES if n in names)


#: ``--target`` device -> variants it adds: a CPU build's defaults; CUDA gets fp16 (MultiHeadAttention, runs on
#: CUDA and, slower, on the CPU execution provider of any runtime from the floor on).
TARGETS = {"cpu": DEFAULT_VARIANTS, "cuda": ("fp32", "fp16")}


def variants_for_targets(variants: str | Iterable[str] | None, targets: str | Iterable[str] | None) -> tuple[str, ...]:
    """Variants to build for ``targets`` ("cpu", "cuda" or "cpu,cuda"): ``variants`` (default: the CPU set) plus
    what each target needs; ``targets=None`` builds ``variants`` as given."""
    if targets is None:
        return parse_variants(variants)
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [str(t).strip() for t in targets]
    names = [t for t in names if t]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        bad = unknown[0] if unknown else ""
        raise UsageError(f"unknown --target '{bad}'; choose cpu, cuda or cpu,cuda")
    base = () if variants is None else parse_variants(variants)
    if variants is None and "cpu" not in names:
        base = ()
    extra = [v for t in names for v in TARGETS[t]]
    return parse_variants([*base, *extra])


def _order(name: str) -> int:
    return list(VARIANT_FILES).index(name) if name in VARIANT_FILES else len(VARIANT_FILES)


def _guard_source(model: str, out: Path) -> None:
    """Refuse an output that is, or contains, the checkpoint directory: --force would delete the model."""
    src = Path(model).expanduser()
    if not src.exists():
        return
    src, dst = src.resolve(), out.resolve()
    if src == dst or dst in src.parents:
        raise UsageError(f"output {out} would replace the checkpoint {model}; choose an output directory outside it")


def _validate_check_args(text, thresholds, max_tokens) -> str | None:
    """Fail on a bad --text or --threshold before minutes of export and quantization, not after."""
    from .accuracy.evaltext import read_text
    from .accuracy.gates import parse_thresholds

    parse_thresholds(thresholds)
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise UsageError(f"--max-tokens must be a positive integer (got {max_tokens})")
    if text is None:
        return None
    read_text(text)
    return str(text)


def _precheck_text(stage: Path, text: str, max_tokens: int | None) -> None:
    """Tokenize --text with the package tokenizer now, so a too-short text fails before quantization."""
    from .accuracy.evaltext import read_text, tokenize
    from .package import Package

    pkg = Package.open(stage)
    raw, source = read_text(text)
    tokenize(raw, source, pkg.tokenizer_path, pkg.dims.n_positions, max_tokens)


# The stages are module functions so they can be replaced in tests (e.g. to interrupt a build).
def _export(model: str, out: Path, progress: Progress, opset: int | None):
    from .exporting import export_package

    return export_package(model, out, opset=opset, force=True, progress=progress)


def _quantize(path: Path, mode: str, progress: Progress) -> dict:
    from .quantizing import quantize_package

    return quantize_package(path, mode, progress=progress)


def _check(path: Path, variants: list[str], text, thresholds, max_tokens, progress: Progress) -> dict:
    from .checking import check_package

    shown = set()

    def on_step(done: int, total: int, label: str) -> None:  # a line per quarter, not per window
        quarter = 4 * done // max(total, 1)
        if quarter not in shown and 0 < done < total:
            shown.add(quarter)
            progress(f"{100 * done // total}% ({label})")

    return check_package(
        path,
        variants=variants,
        reference=REFERENCE,
        text=text,
        max_tokens=max_tokens,
        thresholds=thresholds,
        progress=progress,
        record=True,
        on_step=on_step,
    )


def build_package(
    model: str,
    out: str | os.PathLike,
    variants: str | Iterable[str] | None = DEFAULT_VARIANTS,
    text: str | os.PathLike | None = None,
    allow_regression: bool = False,
    force: bool = False,
    progress: Progress = lambda msg: None,
    thresholds: Mapping[str, float] | Iterable[str] | None = None,
    opset: int | None = None,
    max_tokens: int | None = None,
    target: str | Iterable[str] | None = None,
) -> BuildResult:
    """Build a package with ``variants`` at ``out``; see the module docstring.

    fp32 is always exported (it is the source of the other variants and the accuracy reference); it is
    kept in the package only when listed in ``variants``. ``target`` ("cpu", "cuda", "cpu,cuda") adds the
    variants each device needs (see ``TARGETS``) so one package serves both. ``thresholds`` and ``max_tokens`` go to the
    accuracy check (see :func:`gpt2deploy.checking.check_package`). Raises :class:`RegressionError` (and writes
    nothing) when no requested variant survives its gate.
    """
    wanted = variants_for_targets(variants, target)
    quantized = [v for v in wanted if v != REFERENCE]
    text = _validate_check_args(text, thresholds, max_tokens) if quantized else None
    out = check_output_dir(out, force)
    _guard_source(str(model), out)
    seconds: dict[str, float] = {}
    report = None
    rejected: dict[str, list[str]] = {}
    with staged_dir(out) as stage:
        t0 = time.perf_counter()
        _export(str(model), stage, lambda m: progress(f"[export] {m}"), opset)
        seconds["export"] = time.perf_counter() - t0
        if quantized and text is not None:
            _precheck_text(stage, text, max_tokens)
        for i, mode in enumerate(quantized, 1):
            t0 = time.perf_counter()
            progress(f"[quantize {mode}] {i}/{len(quantized)}")
            _quantize(stage, mode, lambda m, mode=mode: progress(f"[quantize {mode}] {m}"))
            seconds[f"quantize {mode}"] = time.perf_counter() - t0
        if quantized:
            t0 = time.perf_counter()
            progress(f"[check] {', '.join(quantized)} against {REFERENCE}")
            report = _check(stage, quantized, text, thresholds, max_tokens, lambda m: progress(f"[check] {m}"))
            seconds["check"] = time.perf_counter() - t0
            for name in quantized:
                entry = report["variants"][name]
                if not entry["passed"]:
                    rejected[name] = list(entry.get("failures") or ["failed its accuracy gate"])
        manifest = load_manifest(stage)
        sizes = {name: manifest["variants"][name]["size"] for name in manifest["variants"]}
        drop = [] if allow_regression else list(rejected)
        if REFERENCE not in wanted:
            drop.append(REFERENCE)
        kept = [v for v in wanted if v not in drop]
        if not kept:
            why = "; ".join(f"{n}: {', '.join(r)}" for n, r in rejected.items())
            raise RegressionError(
                f"no requested variant passed its accuracy gate ({why}); nothing was written. "
                "Pass --allow-regression to package them anyway, or build fp32 too"
            )
        progress(f"[package] writing {', '.join(kept)}" + (f" (dropping {', '.join(drop)})" if drop else ""))
        for name in drop:
            for f in manifest["variants"][name]["files"]:
                (stage / f["path"]).unlink(missing_ok=True)
            del manifest["variants"][name]
        for name in rejected:
            if name in manifest["variants"]:
                manifest["variants"][name]["allowed_regression"] = True
        manifest["build"] = {
            "variants": list(wanted),
            "reference": REFERENCE,
            "reference_in_package": REFERENCE in wanted,
            "allow_regression": allow_regression,
            "rejected": {n: rejected[n] for n in sorted(rejected, key=_order)},
        }
        save_manifest(stage, manifest)
        _prune_empty_dirs(stage)
    if report is not None:
        report["package"] = str(out)  # it was measured in the staging directory
    rows = summary_rows(wanted, sizes, report, rejected, allow_regression)
    return BuildResult(out, manifest, kept, rejected, rows, report, seconds)


def _prune_empty_dirs(root: Path) -> None:
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()


def summary_rows(wanted, sizes: dict, report: dict | None, rejected: dict, allow_regression: bool) -> list[dict]:
    """One row per requested variant: size, ratio to fp32, ppl delta, top-1 agreement, gate, fate."""
    from .inspection import accuracy_summary

    rows = []
    ref_size = sizes.get(REFERENCE)
    for name in wanted:
        size = sizes.get(name)
        row = {"variant": name, "size": size, "size_ratio": (size / ref_size) if size and ref_size else None}
        if name == REFERENCE:
            row.update(ppl_delta=None, top1=None, passed=True, status="reference")
        else:
            acc = (report or {}).get("variants", {}).get(name, {})
            row.update(accuracy_summary(acc))
            if name in rejected:
                row["status"] = "FAIL (kept: --allow-regression)" if allow_regression else "FAIL (not packaged)"
            else:
                row["status"] = "pass"
        rows.append(row)
    return rows


def format_summary(rows: list[dict]) -> str:
    """The build summary table as text."""
    from .inspection import fmt_pct, fmt_size

    header = ("variant", "size", "vs fp32", "ppl Δ", "top-1", "gate")
    lines = [header]
    for r in rows:
        lines.append(
            (
                r["variant"],
                fmt_size(r["size"]),
                f"{r['size_ratio']:.2f}x" if r.get("size_ratio") else "-",
                fmt_pct(r.get("ppl_delta"), signed=True),
                fmt_pct(r.get("top1")),
                r["status"],
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=False)).rstrip() for line in lines)
