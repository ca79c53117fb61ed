"""Where a batch-1 decode step goes, and what session settings and int4 recipe parameters buy (A/B, same run).

    python benchmarks/decode_profile.py [--package PKG] [--steps 64] [--rounds 5] [--threads 2]

Profile: ONNX Runtime's profiler over ``--steps`` decode steps of the runtime's own loop (``KVStepper``, in-place
KV cache, 32-token context) per variant: kernel time per op type, the time of ``run`` outside the kernels
(scheduling, thread pool, binding), and the Python time per step outside ``run``.

A/B: decode tok/s of the same loop under alternatives, each against the runtime's configuration in the same
round (alternating order): intra-op thread-pool spinning off, one thread, and int4 recipes with other block
sizes / accuracy levels (quantized once into a copy of the package under benchmarks/.work/). The median of the
per-round ratios is reported. Results go to RESULTS.md through ``results.record``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import prepare  # noqa: E402
import results  # noqa: E402

CONTEXT = 32


def stepper_for(pkg: Path, variant: str, threads: int, config: dict | None = None, profile: str | None = None):
    """A KV stepper over a session built like the runtime's, with extra session config entries."""
    import onnxruntime as ort

    from gpt2deploy.package import Package
    from gpt2deploy.runtime.kvcache import KVStepper
    from gpt2deploy.runtime.session import DecoderSession

    package = Package.open(pkg)
    dec = DecoderSession(package, variant, "cpu", threads)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    for k, v in (config or {}).items():
        opts.add_session_config_entry(k, v)
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    dec.session = ort.InferenceSession(str(package.variant_path(variant)), opts, providers=["CPUExecutionProvider"])
    return KVStepper(dec, 1, CONTEXT + 512)


def decode(stepper, steps: int) -> tuple[float, float]:
    """(tok/s, python seconds per step outside run) for ``steps`` greedy steps after a 32-token prompt."""
    prompt = (np.arange(CONTEXT, dtype=np.int64) * 37 % 50000 + 100)[None]
    logits = stepper.prefill(prompt, np.ones_like(prompt))
    stepper.run_seconds = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = stepper.step(logits.argmax(axis=-1))
    wall = time.perf_counter() - t0
    return steps / wall, (wall - stepper.run_seconds) / steps


def profile(pkg: Path, variant: str, threads: int, steps: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="ortprof-")
    s = stepper_for(pkg, variant, threads, profile=str(Path(tmp) / variant))
    decode(s, 4)  # warm-up
    tok_s, py = decode(s, steps)
    path = s.dec.session.end_profiling()
    events = json.loads(Path(path).read_text())
    shutil.rmtree(tmp, ignore_errors=True)
    runs = [e for e in events if e.get("name") == "model_run"][-steps:]
    start = runs[0]["ts"]
    ops: dict[str, float] = defaultdict(float)
    kernels = 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            ops[e.get("args", {}).get("op_name", "?")] += e["dur"]
            kernels += e["dur"]
    run_us = sum(r["dur"] for r in runs)
    return {
        "tok_s": tok_s,
        "run_ms": run_us / steps / 1e3,
        "kernel_ms": kernels / steps / 1e3,
        "python_ms": py * 1e3,
        "ops": {k: v / steps / 1e3 for k, v in sorted(ops.items(), key=lambda kv: -kv[1])},
    }


def recipe_copy(pkg: Path, name: str, say, mode: str = "int4", **options) -> Path | None:
    """A copy of ``pkg`` whose ``mode`` variant is quantized with ``options`` (cached under benchmarks/.work/)."""
    from gpt2deploy.quantizing import quantize_package

    out = prepare.WORK / f"{pkg.name}-{name}"
    if (out / "manifest.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # fp32 graph and shared files copied: a package refuses symlinks out of it, onnx hard-linked external data
    for f in pkg.rglob("*"):
        if f.is_file() and "_int" not in f.name and "_q4" not in f.name:
            dst = tmp / f.relative_to(pkg)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst)
    say(f"quantizing {mode} {options} into {out}")
    try:
        quantize_package(tmp, mode, force=True, **options)
    except Exception as e:  # a recipe the quantizer refuses: left out of the table
        say(f"recipe {name} failed: {e}")
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    tmp.rename(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", type=Path, help="package (default: the GPT-2-small-shaped one of run.py)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-recipes", action="store_true", help="skip the int4 recipe A/B (it quantizes copies)")
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args(argv)

    def say(msg):
        print(f"[profile] {msg}", file=sys.stderr, flush=True)

    pkg = a.package
    if pkg is None:
        pkg, failed = prepare.gpt2deploy_package(prepare.default_checkpoint(say=say), ["int8", "int4"], say=say)
        if pkg is None or failed:
            raise SystemExit(f"error: the package could not be built: {failed}")
    body = [f"Package: {pkg.name}; batch 1, {CONTEXT}-token context, {a.steps} decode steps, {a.threads} threads."]

    rows, op_rows = [], []
    for v in ("fp32", "int8", "int4"):
        say(f"profiling {v}")
        p = profile(pkg, v, a.threads, a.steps)
        rows.append(
            [
                v,
                f"{p['tok_s']:.1f}",
                f"{p['run_ms']:.2f}",
                f"{p['kernel_ms']:.2f}",
                f"{p['run_ms'] - p['kernel_ms']:.2f}",
                f"{p['python_ms']:.2f}",
            ]
        )
        top = list(p["ops"].items())[:6]
        op_rows.append([v, ", ".join(f"{k} {ms:.2f}" for k, ms in top)])
    body += [
        "Profile (ONNX Runtime profiler on; per decode step):",
        results.md_table(
            ["variant", "tok/s (profiling on)", "run ms", "kernels ms", "run outside kernels ms", "Python ms"], rows
        ),
        "Kernel time per step by op type (ms, largest first):",
        results.md_table(["variant", "ops"], op_rows),
    ]

    base = {"variant": "int4", "pkg": pkg, "threads": a.threads, "config": {}}
    alternatives = {
        "int8 (runtime defaults)": {**base, "variant": "int8"},
        "int4, thread-pool spinning off": {**base, "config": {"session.intra_op.allow_spinning": "0"}},
        "int4, 1 thread": {**base, "threads": 1},
    }
    if not a.no_recipes:
        for name, opts in {
            "block64": {"block_size": 64},
            "block128": {"block_size": 128},
            "acc1": {"block_size": 32, "accuracy_level": 1},
            "head8": {"head_bits": 8},
            "head4-block32": {"head_block_size": 32},
            "asymmetric": {"symmetric": False},
            "int8block": {"mode": "int8", "granularity": "block"},
            "int8untied": {"mode": "int8", "share_embedding": False},
        }.items():
            copy = recipe_copy(pkg, name, say, **opts)
            if copy is not None:
                v = opts.get("mode", "int4")
                label = ", ".join(f"{k}={x}" for k, x in opts.items() if k != "mode")
                alternatives[f"{v} ({label})"] = {**base, "variant": v, "pkg": copy}
    steppers = {"int4 (runtime defaults)": stepper_for(pkg, "int4", a.threads)}
    for name, c in alternatives.items():
        steppers[name] = stepper_for(c["pkg"], c["variant"], c["threads"], c["config"])
    for s in steppers.values():
        decode(s, 4)
    speeds: dict[str, list[float]] = {k: [] for k in steppers}
    ratios: dict[str, list[float]] = {k: [] for k in alternatives}
    for r in range(a.rounds):
        for name in alternatives:
            pair = ["int4 (runtime defaults)", name]
            if r % 2:
                pair.reverse()
            got = {k: decode(steppers[k], a.steps)[0] for k in pair}
            for k, v in got.items():
                speeds[k].append(v)
            ratios[name].append(got[name] / got["int4 (runtime defaults)"])
        say(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}x" for k, v in ratios.items()))
    ab = [["int4 (runtime defaults)", f"{statistics.median(speeds['int4 (runtime defaults)']):.1f}", "1.00x"]]
    for name, v in ratios.items():
        ab.append([name, f"{statistics.median(speeds[name]):.1f}", f"{statistics.median(v):.2f}x"])
    body += [
        f"A/B, decode tok/s of the loop above (profiling off), {a.rounds} rounds, each alternative against the "
        "runtime's int4 in the same round (alternating order); median, and median of the per-round ratios:",
        results.md_table(["configuration", "decode tok/s", "vs int4 defaults"], ab),
    ]
    text = "\n\n".join(body)
    print(text)
    if not a.no_record:
        results.record(results.per_cpu_kind("Batch-1 decode step profile"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
