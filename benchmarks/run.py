"""Side-by-side benchmark: gpt2deploy variants vs transformers, Optimum and CTranslate2 on one checkpoint.

    python benchmarks/run.py                      # GPT-2-small shape, batch 1, 32 + 128 greedy tokens, 2 threads
    python benchmarks/run.py --repeat 7 --engines gpt2deploy-int8,transformers

Every engine runs in its own worker process (so peak RSS is per engine), loads and warms up once, then the
harness asks each for one timed run per round, in an order that rotates and reverses every round, so drift on
a shared machine spreads over all engines. Prints the markdown table (ratios vs transformers ``generate()``)
and writes it with the full JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bandwidth  # noqa: E402
import envs  # noqa: E402
import llamacpp  # noqa: E402
import peer_ratios  # noqa: E402
import plot  # noqa: E402
import prepare  # noqa: E402
import results  # noqa: E402
import table  # noqa: E402
from peers import Peer  # noqa: E402

ALL_ENGINES = [
    "gpt2deploy-fp32",
    "gpt2deploy-int8",
    "gpt2deploy-int4",
    "transformers",
    "optimum",
    "ctranslate2-int8",
    "ctranslate2-float32",
    "llamacpp-f32",
    "llamacpp-q8_0",
    "llamacpp-q4_0",
]


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--checkpoint",
        type=Path,
        help="local GPT-2 checkpoint (default: a random GPT-2-small-shaped one, created once)",
    )
    ap.add_argument("--engines", default=",".join(ALL_ENGINES), help=f"comma list from: {', '.join(ALL_ENGINES)}")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per engine (rounds)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--gap", type=float, default=1.0, help="seconds of idle between engines (lets spinning threads park)"
    )
    ap.add_argument("--no-curve", action="store_true", help="skip the long-context curve")
    ap.add_argument(
        "--curve-engines", default="all", help="engines that also measure the long-context curve (comma list or 'all')"
    )
    ap.add_argument("--curve-points", type=int, default=8)
    ap.add_argument("--curve-steps", type=int, default=16)
    ap.add_argument("--curve-repeat", type=int, default=3, help="runs per curve position (the median is kept)")
    ap.add_argument(
        "--rebuild",
        action="store_true",
        help="re-export and re-quantize the gpt2deploy package (e.g. after changing the quantizer)",
    )
    ap.add_argument(
        "--optimum-python",
        help="python of an environment with optimum-onnx (default: create benchmarks/.work/optimum-venv)",
    )
    ap.add_argument(
        "--no-llama-build",
        action="store_true",
        help="report llama.cpp unavailable instead of building it when its tools are missing",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    unknown = [e for e in a.engines.split(",") if e not in ALL_ENGINES]
    if unknown:
        ap.error(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ALL_ENGINES)}")
    for name in ("repeat", "prompt_tokens", "new_tokens", "threads", "curve_points", "curve_steps", "curve_repeat"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


def build_peers(a, ckpt: Path, prompt: list[int], log_dir: Path) -> list[Peer]:
    engines = a.engines.split(",")
    common = {"threads": a.threads, "prompt": prompt, "new_tokens": a.new_tokens, "warmup": 1}
    peers = []
    wanted = [e.split("-", 1)[1] for e in engines if e.startswith("gpt2deploy-")]
    if wanted:
        pkg, failed = prepare.gpt2deploy_package(ckpt, wanted, say=say)
    for key in engines:
        if key.startswith("gpt2deploy-"):
            variant = key.split("-", 1)[1]
            reason = failed.get(variant, "") if pkg else failed[variant]
            peers.append(
                Peer(key, {**common, "engine": "gpt2deploy", "model": str(pkg), "variant": variant}, reason=reason)
            )
        elif key == "transformers":
            peers.append(Peer(key, {**common, "engine": "transformers", "model": str(ckpt)}))
        elif key == "optimum":
            python, reason = (
                (a.optimum_python, "")
                if a.optimum_python
                else envs.ensure_venv(
                    prepare.WORK / "optimum-venv", envs.OPTIMUM_REQUIREMENTS, log_dir / "optimum-venv.log", say=say
                )
            )
            cache = prepare.WORK / f"optimum-{prepare.checkpoint_key(ckpt)}"
            spec = {**common, "engine": "optimum", "model": str(ckpt), "cache": str(cache)}
            peers.append(
                Peer(
                    key,
                    spec,
                    python=str(python) if python else None,
                    reason=f"not available: {reason}" if reason else "",
                )
            )
        elif key.startswith("ctranslate2-"):
            quant = key.split("-", 1)[1]
            path, reason = prepare.ctranslate2_model(ckpt, quant, say=say)
            spec = {
                **common,
                "engine": "ctranslate2",
                "model": str(path),
                "compute_type": quant,
                "tokenizer": str(ckpt / "tokenizer.json"),
            }
            peers.append(Peer(key, spec, reason=reason))
        elif key.startswith("llamacpp-"):
            quant = key.split("-", 1)[1].upper()
            log = log_dir / "llamacpp.log"
            reason = llamacpp.ensure_build(log, say=say, build=not a.no_llama_build)
            models, reason = (
                ({}, reason)
                if reason
                else llamacpp.gguf_models(ckpt, prepare.WORK, prepare.checkpoint_key(ckpt), log, say=say)
            )
            src = llamacpp.source_dir()
            spec = {
                **common,
                "engine": "llamacpp",
                "model": str(models.get(quant, "")),
                "quant": quant,
                "bench": str(llamacpp.tool("llama-bench")),
                "version": (src.parent.parent.name.replace("_", "-") if src else "")
                + (", AMX off" if llamacpp.build_dir() != "build" else ""),
            }
            peers.append(Peer(key, spec, reason=reason))
    return peers


def main(argv=None) -> int:
    a = parse_args(argv)
    from gpt2deploy.benchmark.longctx import curve_positions
    from gpt2deploy.benchmark.workload import synthetic_prompts

    ckpt = (a.checkpoint or prepare.default_checkpoint(say=say)).resolve()
    if a.rebuild:
        prepare.forget_package(ckpt, say=say)
    config = json.loads((ckpt / "config.json").read_text())
    n_ctx, vocab, eos = config.get("n_positions", 1024), config.get("vocab_size", 50257), config.get("eos_token_id")
    if a.prompt_tokens + a.new_tokens > n_ctx:
        raise SystemExit(f"error: --prompt-tokens + --new-tokens exceed the checkpoint's context of {n_ctx}")
    avoid = (eos,) if eos is not None else ()
    prompt = synthetic_prompts(1, a.prompt_tokens, vocab, seed=0, avoid=avoid)[0]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    log_dir = prepare.WORK / "logs" / stamp
    log_dir.mkdir(parents=True, exist_ok=True)

    peers = build_peers(a, ckpt, prompt, log_dir)
    try:
        for p in peers:
            if p.available:
                say(f"starting {p.key} (load + warm-up)")
                p.start(log_dir)
            say(f"{p.key}: {'ready: ' + p.name if p.available else p.reason}")
        order = [p for p in peers if p.available]
        probes: dict[str, list[float]] = {"1": [], str(a.threads): []}
        for r in range(a.repeat):
            time.sleep(a.gap)
            for n in {1, a.threads}:
                probes[str(n)].append(bandwidth.read_gbps(n))
            say(
                f"round {r + 1}/{a.repeat}: read bandwidth "
                + ", ".join(f"{v[-1]:.1f} GB/s ({n} thr)" for n, v in probes.items())
            )
            k = r % len(order) if order else 0
            turn = order[k:] + order[:k]
            if r % 2:
                turn.reverse()
            for p in turn:
                if not p.available:
                    continue
                time.sleep(a.gap)
                p.run(r)
                if p.available:
                    last = p.runs[-1]
                    say(
                        f"round {r + 1}/{a.repeat} {p.key}: decode {last['decode_tok_s']:.1f} tok/s, TTFT "
                        f"{last['ttft_ms']:.1f} ms"
                    )
                else:
                    say(f"round {r + 1}/{a.repeat} {p.key}: failed: {p.reason}")
        bandwidth.release()
        for p in peers:
            p.record_memory()
        if not a.no_curve:
            positions = curve_positions(n_ctx, a.curve_steps, a.curve_points)
            prompts = [synthetic_prompts(1, pos, vocab, seed=1 + i, avoid=avoid)[0] for i, pos in enumerate(positions)]
            chosen = None if a.curve_engines == "all" else set(a.curve_engines.split(","))
            for p in peers:
                if p.available and (chosen is None or p.key in chosen):
                    time.sleep(a.gap)
                    say(f"long-context curve: {p.key}")
                    p.measure_curve(positions, prompts, a.curve_steps, a.curve_repeat)
    finally:
        for p in peers:
            p.stop()

    rows = [table.summarize_peer(p) for p in peers]
    table.add_ratios(rows)
    result = {
        "workload": {
            "shape": f"GPT-2 {config.get('n_layer')} layers x {config.get('n_embd')} hidden, {n_ctx} context"
            + (" (GPT-2-small, 124M)" if (config.get("n_layer"), config.get("n_embd")) == (12, 768) else ""),
            "checkpoint": str(ckpt),
            "prompt_tokens": a.prompt_tokens,
            "new_tokens": a.new_tokens,
            "threads": a.threads,
            "repeat": a.repeat,
            "curve_steps": a.curve_steps,
            "curve_repeat": a.curve_repeat,
        },
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": _cpus()},
        "engines": rows,
        "bandwidth": {n: statistics.median(v) for n, v in probes.items() if v},
        "created": stamp,
    }
    md = table.markdown(result)
    a.out.mkdir(parents=True, exist_ok=True)
    for name in (f"bench-{stamp}", "latest"):
        (a.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (a.out / f"{name}.md").write_text(md)
    png = plot.plot_curves(result, a.out / f"bench-{stamp}.png")
    if png is not None:
        (a.out / "latest.png").write_bytes(png.read_bytes())
    print(md)
    results.record("Engines", md)
    llama = peer_ratios.section(result)
    if llama is not None:
        results.record(results.per_cpu_kind("Batch-1 decode vs llama.cpp"), llama)
        print(llama)
    say(f"wrote {a.out / f'bench-{stamp}'}.md, .json{', .png' if png else ''} (worker logs in {log_dir})")
    return 0


def _cpus() -> int | None:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    sys.exit(main())
