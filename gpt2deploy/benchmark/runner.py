"""Benchmark the variants of one package: load each, warm up, time repeated runs, then the long-context curve."""

from __future__ import annotations

import os
import platform
import time

from ..package import Package
from ..runtime.providers import resolve_device
from .longctx import measure_curve
from .measure import measure_runs
from .memory import MB, PeakRss, current_rss, gpu_memory, release_freed_memory
from .workload import BenchConfig, synthetic_prompts


def bench_package(path: str | os.PathLike, config: BenchConfig, all_variants: bool = False, progress=None) -> dict:
    """Measure ``config.variants`` (or every variant with ``all_variants``; the runtime's pick when neither).

    Returns a JSON-ready report: {"package", "config", "machine", "variants": {name: {...}}}.
    Bad sizes, a missing package or variant raise typed errors before anything is measured.
    """
    import gpt2deploy

    config.validate()
    package = Package.open(path)
    dims = package.dims
    config.validate_for(dims.n_positions, dims)
    device = resolve_device(config.device)
    skipped: dict[str, str] = {}
    if all_variants:
        names = []
        for name in sorted(package.variants, key=_variant_order):
            why = _not_for_device(name, package.variants[name], device)
            if why:
                skipped[name] = why
            else:
                names.append(name)
        if not names:
            from ..errors import VariantError

            raise VariantError(
                f"no variant of {package.root} runs on {device} "
                f"({'; '.join(f'{k}: {v}' for k, v in skipped.items())}); "
                "pass --variant to measure one anyway"
            )
    elif config.variants:
        names = list(dict.fromkeys(config.variants))
        for name in names:
            package.variant(name)  # VariantError listing the present ones
    else:
        names = [None]  # the runtime's own choice for this device
    say = progress or (lambda m: None)

    avoid = tuple(i for i in (dims.eos_token_id,) if i is not None)
    prompts = synthetic_prompts(config.batch, config.prompt_tokens, dims.vocab_size, seed=config.seed, avoid=avoid)
    report = {
        "package": str(package.root),
        "model": {
            "n_layer": dims.n_layer,
            "n_head": dims.n_head,
            "hidden_size": dims.hidden_size,
            "vocab_size": dims.vocab_size,
            "n_positions": dims.n_positions,
        },
        "config": {**config.as_dict(), "device": device},
        "machine": _machine(),
        "variants": {},
    }
    if skipped:
        report["skipped"] = skipped
    for name, why in skipped.items():
        say(f"[bench] {name}: skipped ({why}; pass --variant {name} to measure it anyway)")
    for requested in names:
        release_freed_memory()  # what the previous variant freed must not count in this one's peak
        tracker = PeakRss().start()
        t0 = time.perf_counter()
        model = gpt2deploy.load(
            package.root, variant=requested, device=device, threads=config.threads, verify=config.verify
        )
        load_seconds = time.perf_counter() - t0
        name = model.variant
        say(f"[bench] {name}: loaded in {load_seconds:.2f}s on {model.device}")
        rss_loaded = current_rss()
        runs = measure_runs(
            model,
            prompts,
            config.new_tokens,
            config.repeat,
            config.warmup,
            progress=lambda m, n=name: say(f"[bench] {n}: {m}"),
        )
        entry = {
            "variant": name,
            "device": model.device,
            "file_mb": round(package.variant(name).get("size", 0) / MB, 1),
            "load_seconds": load_seconds,
            "selection": getattr(model, "selection_reason", "requested"),
            **runs,
        }
        if config.long_context:
            entry["long_context"] = measure_curve(
                model,
                dims.n_positions,
                dims.vocab_size,
                batch=config.batch,
                steps=config.curve_steps,
                points=config.curve_points,
                repeat=config.curve_repeat,
                seed=config.seed,
                avoid=avoid,
                progress=lambda m, n=name: say(f"[bench] {n}: {m}"),
            )
        peak = tracker.stop()
        entry["memory"] = {
            "peak_rss_mb": round(peak / MB, 1),
            "rss_before_load_mb": round(tracker.start_rss / MB, 1),
            "rss_after_load_mb": round(rss_loaded / MB, 1),
            "method": tracker.method,
        }
        gpu = gpu_memory(model.device)
        if gpu is not None:
            entry["memory"]["gpu"] = gpu
        if getattr(model, "notes", None):
            entry["notes"] = list(model.notes)
        report["variants"][name] = entry
        del model
    return report


def _not_for_device(name: str, entry: dict, device: str) -> str:
    """Why ``--all`` leaves a variant out on ``device`` ('' when it is measured)."""
    provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[device]
    providers = entry.get("providers")
    if providers and provider not in providers:
        return f"built for {', '.join(providers)}, not {device}"
    if name == "fp16" and device == "cpu":
        return "fp16 is a CUDA variant; the CPU execution provider runs it slower than fp32"
    return ""


def _variant_order(name: str) -> tuple[int, str]:
    order = {"fp32": 0, "fp16": 1, "int8": 2, "int4": 3}
    return (order.get(name, 9), name)


def _machine() -> dict:
    import onnxruntime as ort

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
    }
