"""`gpt2deploy check`: measure package variants against a reference on real text and apply accuracy gates.

``check_package`` returns a report; it does not raise on a regression (the CLI and ``build`` decide what a
failed gate means). Bad input raises UsageError/VariantError before any evaluation, and nothing is written.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from . import __version__
from .accuracy import evaltext, gates, probes
from .accuracy.baseline import check_compatible, compare, load_baseline, validate_baseline
from .accuracy.metrics import LogitComparison, ReferenceLogits, greedy_prefix_match
from .accuracy.reference import OnnxModel, open_reference
from .accuracy.report import REPORT_FORMAT, REPORT_VERSION, sanitize
from .errors import UsageError
from .package import Package

Progress = Callable[[str], None]
Step = Callable[[int, int, str], None]


def default_variants(pkg: Package, reference: str) -> list[str]:
    """Every variant except the reference one; fp32 alone is checked against itself (self-consistency probes)."""
    names = [n for n in pkg.variants if n != reference]
    return names or list(pkg.variants)


def model_identity(pkg: Package) -> dict:
    """What makes two reports comparable: the source weights and the model's dims."""
    d = pkg.dims
    return {
        "weights_sha256": pkg.manifest.get("source", {}).get("weights_sha256"),
        "vocab_size": d.vocab_size,
        "n_layer": d.n_layer,
        "n_head": d.n_head,
        "hidden_size": d.hidden_size,
        "n_positions": d.n_positions,
    }


def check_package(
    path: str | os.PathLike,
    variants: Iterable[str] | None = None,
    reference: str | os.PathLike = "fp32",
    text: str | os.PathLike | None = None,
    max_tokens: int | None = None,
    baseline: str | os.PathLike | Mapping | None = None,
    thresholds: Mapping[str, float] | Iterable[str] | None = None,
    progress: Progress = lambda msg: None,
    record: bool = True,
    *,
    device: str = "cpu",
    threads: int | None = None,
    on_step: Step | None = None,
) -> dict:
    """Check ``variants`` of the package at ``path`` against ``reference``; returns the report.

    ``report["variants"][name] = {"passed", "metrics", "failures", "thresholds", ...}`` and ``report["passed"]``.
    With ``record`` the latest result per variant is stored in the manifest under ``variants[name]["accuracy"]``.
    ``thresholds`` overrides default gates (``{"kl_mean": 0.05}`` or ``["kl_mean=0.05"]``; ``NAME.tol`` sets a
    baseline tolerance). ``on_step(done, total, label)`` reports progress for a progress bar.
    """
    t0 = time.perf_counter()
    pkg = Package.open(path)
    names = _resolve_variants(pkg, variants, reference)
    overrides, tol_overrides = gates.parse_thresholds(thresholds)
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise UsageError(f"--max-tokens must be a positive integer (got {max_tokens})")
    if record and not os.access(pkg.root, os.W_OK):
        raise UsageError(f"package {pkg.root} is not writable, so the result cannot be recorded; pass --no-record")
    in_package_ref = [str(reference)] if str(reference) in pkg.variants and str(reference) not in names else []
    pkg.check_integrity(variants=[*names, *in_package_ref])

    raw, source = evaltext.default_text() if text is None else evaltext.read_text(text)
    ev = evaltext.tokenize(raw, source, pkg.tokenizer_path, pkg.dims.n_positions, max_tokens)
    identity = model_identity(pkg)
    base = None
    if baseline is not None:
        base = validate_baseline(dict(baseline)) if isinstance(baseline, Mapping) else load_baseline(baseline)
        check_compatible(
            base,
            identity,
            ev.identity(),
            where=f"baseline {baseline if not isinstance(baseline, Mapping) else ''}".strip(),
        )

    progress(f"{ev.tokens} tokens of {ev.source} in {len(ev.windows)} windows of {ev.windows.shape[1]}")
    ref_model, ref_desc = open_reference(pkg, reference, device, threads)
    same_as_ref = {n for n in names if ref_desc["kind"] == "variant" and n == ref_desc["variant"]}
    models = {n: (ref_model if n in same_as_ref else OnnxModel(pkg, n, device, threads)) for n in names}
    progress(f"checking {', '.join(names)} against {_describe(ref_desc)}")

    window = ev.windows.shape[1]
    total = len(ev.windows) + 1 + 3 * len(names)
    done = 0

    def step(label: str) -> None:
        """Report the unit about to run (``done`` units finished so far)."""
        nonlocal done
        if on_step:
            on_step(done, total, label)
        done += 1

    comparisons = {n: LogitComparison() for n in names}
    for i, w in enumerate(ev.windows):
        step(f"window {i + 1}/{len(ev.windows)}")
        ref_logits = ref_model.forward(w[None])[0][0]
        ref_stats = ReferenceLogits.of(ref_logits)
        for n in names:
            logits = ref_logits if n in same_as_ref else models[n].forward(w[None])[0][0]
            comparisons[n].add(ref_stats, logits, w[1:])

    prompts, new_tokens = ev.greedy_prompts(pkg.dims.n_positions)
    step("greedy (reference)")
    ref_greedy = probes.greedy(ref_model, prompts, new_tokens)
    pad_id = pkg.dims.eos_token_id if pkg.dims.eos_token_id is not None else 0
    results = {}
    for n in names:
        model = models[n]
        counter = probes.Counter()
        step(f"greedy ({n})")
        var_greedy = ref_greedy if n in same_as_ref else probes.greedy(model, prompts, new_tokens, counter)
        step(f"cache ({n})")
        cache_diff = probes.cache_vs_recompute(model, probes.cache_tokens(ev.stream, window), counter)
        step(f"batch ({n})")
        batch_diff = probes.batch_vs_single(model, probes.batch_rows(ev.stream, window), pad_id, counter)
        matched = greedy_prefix_match(ref_greedy, var_greedy)
        metrics = comparisons[n].summary()
        metrics.update(
            greedy=float(np.mean(matched) / new_tokens),
            greedy_matched=int(matched.sum()),
            greedy_total=int(matched.size * new_tokens),
            cache_diff=cache_diff,
            batch_diff=batch_diff,
        )
        metrics["nonfinite"] += counter.nonfinite
        metrics["tokens"] = ev.tokens
        results[n] = _judge(pkg, n, metrics, overrides, tol_overrides, base)

    report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "gpt2deploy_version": __version__,
        "package": str(pkg.root),
        "model": identity,
        "reference": ref_desc,
        "text": ev.identity(),
        "window": window,
        "greedy": {
            "prompts": int(prompts.shape[0]),
            "prompt_tokens": int(prompts.shape[1]),
            "new_tokens": int(new_tokens),
        },
        "baseline": None if base is None else {"package": base.get("package"), "text": base.get("text")},
        "passed": all(r["passed"] for r in results.values()),
        "variants": results,
    }
    if on_step:
        on_step(total, total, "done")
    report = sanitize(report)
    if record:
        _record(pkg, report)
    progress(f"checked in {time.perf_counter() - t0:.1f}s")
    return report


def _resolve_variants(pkg: Package, variants: Iterable[str] | None, reference) -> list[str]:
    if variants is None:
        return default_variants(pkg, str(reference))
    if isinstance(variants, str):
        variants = [variants]
    names = list(dict.fromkeys(variants))
    if not names:
        raise UsageError("no variant to check; pass --variant NAME or --all")
    for n in names:
        pkg.variant(n)  # VariantError listing the present ones
    return names


def _describe(desc: dict) -> str:
    if desc["kind"] == "variant":
        return f"variant {desc['variant']}"
    if desc["kind"] == "package":
        return f"package {desc['source']} (fp32)"
    return f"PyTorch checkpoint {desc['source']}"


def _judge(pkg: Package, name: str, metrics: dict, overrides: dict, tol_overrides: dict, base: dict | None) -> dict:
    precision = pkg.variant(name).get("precision", name)
    thresholds, used = gates.defaults_for(precision)
    thresholds.update(overrides)
    failures = gates.evaluate(metrics, thresholds)
    if metrics.get("ref_nonfinite"):
        failures.append(
            f"the reference produced {metrics['ref_nonfinite']} NaN/Inf logits; its numbers cannot vouch for this "
            "variant"
        )
    notes = []
    if used != precision:
        notes.append(f"precision '{precision}' has no default gates; using the {used} ones")
    result = {
        "precision": precision,
        "passed": False,
        "metrics": metrics,
        "thresholds": thresholds,
        "failures": failures,
    }
    if base is not None:
        theirs = base["variants"].get(name)
        if isinstance(theirs, dict) and isinstance(theirs.get("metrics"), dict):
            base_failures, detail = compare(metrics, theirs["metrics"], gates.tolerances(tol_overrides))
            failures.extend(base_failures)
            result["baseline"] = detail
        else:
            notes.append("the baseline report has no result for this variant; only the gates apply")
    result["passed"] = not failures
    if notes:
        result["notes"] = notes
    return result


def _record(pkg: Package, report: dict) -> None:
    from .cpuinfo import cpu_kind

    measured_on = cpu_kind()

    def change(manifest: dict) -> None:
        for name, r in report["variants"].items():
            entry = manifest["variants"].get(name)
            if entry is None:
                continue
            entry["accuracy"] = {
                "passed": r["passed"],
                "metrics": r["metrics"],
                "thresholds": r["thresholds"],
                "reference": report["reference"],
                "text": report["text"],
                "measured_on": measured_on,  # int8 numerics depend on the CPU kind (AVX2, AVX-512, VNNI)
            }

    pkg.update_manifest(change)


def write_report(report: dict, out: str | Path) -> None:
    from .fsutil import write_json_atomic

    write_json_atomic(out, report)
