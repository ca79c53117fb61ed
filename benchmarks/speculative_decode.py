"""Speculative decoding (prompt lookup) vs plain greedy decoding, same run, alternating rounds.

    python benchmarks/speculative_decode.py [--package PKG] [--repeat 5] [--threads 2]

Workloads on the trained reference model (gpt2-ref; its package is built once into benchmarks/.work/ unless
``--package`` is given), from the evaluation text:

* grounded: a 300-token passage, a blank line and the passage's first 12 tokens: the continuation rewrites
  the passage (several passages, one per round);
* free: a 32-token prompt from the same text, continued freely.

Each round runs every (variant, workload) plain and with ``speculative="prompt-lookup"`` back to back (the order
flips every round); the table gives median decode tok/s and the median of the per-round speed ratios, and checks
that both produced the same tokens. A second table times one verification step of t tokens against one plain
step on the GPT-2-small-shaped package of ``run.py`` (what a round costs at that shape), when it is built.
Results go to RESULTS.md through ``results.record``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import prepare  # noqa: E402
import results  # noqa: E402

REF = HERE.parent.parent / "shared" / "models" / "gpt2-ref"
EVAL = HERE.parent.parent / "shared" / "eval-text" / "pydoc_topics.txt"


def ref_package(say) -> Path:
    """gpt2-ref built once per version of the graph-writing code (a recipe change builds a new one)."""
    pkg = prepare.WORK / f"ref-pkg-{prepare.graph_code_key()}"
    if not (pkg / "manifest.json").is_file():
        say(f"building {REF} -> {pkg} (once)")
        cmd = [sys.executable, "-c", "from gpt2deploy.cli import main; main()", "build", str(REF), "-o", str(pkg)]
        subprocess.check_call([*cmd, "--variants", "fp32,int8,int4", "--force"], cwd=HERE.parent)
    return pkg


def workloads(model, rounds: int) -> dict[str, list[list[int]]]:
    ids = model.encode(EVAL.read_text(encoding="utf-8")[:200_000])
    sep = model.encode("\n\n")
    grounded, free = [], []
    for r in range(rounds):
        start = 1500 + r * 2300
        passage = ids[start : start + 300]
        grounded.append(passage + sep + passage[:12])
        free.append(ids[start + 1000 : start + 1032])
    return {"grounded (rewrite a 300-token passage)": grounded, "free continuation (32-token prompt)": free}


def timed(model, prompt: list[int], n: int, speculative: str) -> tuple[float, list[int], dict]:
    r = model.generate_ids([prompt], max_new_tokens=n, ignore_eos=True, speculative=speculative)
    return r.timings["decode_tokens_per_second"], r.tokens[0], r.timings.get("speculation") or {}


def verify_cost(pkg: Path, threads: int, reps: int) -> list[list[object]] | None:
    """Seconds of one verification step of t tokens / one plain step, on the GPT-2-small-shaped package."""
    import numpy as np

    import gpt2deploy
    from gpt2deploy.runtime.kvcache import KVStepper

    rows = []
    for variant in ("fp32",):
        try:
            m = gpt2deploy.load(pkg, variant=variant, device="cpu", threads=threads)
        except Exception:  # a variant the harness did not build
            continue
        s = KVStepper(m.session, 1, 256)
        prompt = np.arange(100, 132, dtype=np.int64)[None]
        plain: list[float] = []
        many: dict[int, list[float]] = {t: [] for t in (2, 4, 8, 12)}
        for _ in range(reps):
            s.prefill(prompt, np.ones_like(prompt))
            for _ in range(4):
                t0 = time.perf_counter()
                s.step(np.array([7]))
                plain.append(time.perf_counter() - t0)
            for t in many:
                n = s.length
                t0 = time.perf_counter()
                s.extend(np.full((1, t), 7, dtype=np.int64))
                many[t].append(time.perf_counter() - t0)
                s.truncate(n)
        base = statistics.median(plain)
        rows.append([variant, f"{base * 1e3:.1f}", *(f"{statistics.median(v) / base:.2f}" for v in many.values())])
    return rows or None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", type=Path, help="package of a trained model (default: gpt2-ref, built once)")
    ap.add_argument("--variants", default="fp32")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-record", action="store_true", help="print only; do not write RESULTS.md")
    a = ap.parse_args(argv)

    def say(msg):
        print(f"[speculative] {msg}", file=sys.stderr, flush=True)

    import gpt2deploy

    pkg = a.package or ref_package(say)
    models = {v: gpt2deploy.load(pkg, variant=v, device="cpu", threads=a.threads) for v in a.variants.split(",")}
    loads = workloads(next(iter(models.values())), a.repeat)
    runs: dict[tuple[str, str], dict[str, list]] = {}
    for m in models.values():  # warm-up
        timed(m, loads[next(iter(loads))][0], 16, "off")
    for r in range(a.repeat):
        for v, m in models.items():
            for w, prompts in loads.items():
                rec = runs.setdefault((v, w), {"off": [], "on": [], "ratio": [], "same": [], "accept": []})
                order = ("off", "prompt-lookup") if r % 2 == 0 else ("prompt-lookup", "off")
                out = {mode: timed(m, prompts[r], a.new_tokens, mode) for mode in order}
                (off, toks_off, _), (on, toks_on, stats) = out["off"], out["prompt-lookup"]
                rec["off"].append(off)
                rec["on"].append(on)
                rec["ratio"].append(on / off)
                rec["same"].append(toks_on == toks_off)
                if stats.get("proposed"):
                    rec["accept"].append(stats["accepted"] / stats["proposed"])
                say(f"round {r + 1}/{a.repeat} {v} {w}: {off:.1f} -> {on:.1f} tok/s ({on / off:.2f}x)")
    prepare.WORK.mkdir(parents=True, exist_ok=True)
    raw = {f"{v} | {w}": rec for (v, w), rec in runs.items()}
    (prepare.WORK / "speculative-latest.json").write_text(json.dumps(raw, indent=1))
    table = []
    for (v, w), rec in runs.items():
        med = statistics.median
        table.append(
            [
                v,
                w,
                f"{med(rec['off']):.1f}",
                f"{med(rec['on']):.1f}",
                f"{med(rec['ratio']):.2f}x ({min(rec['ratio']):.2f}-{max(rec['ratio']):.2f})",
                f"{med(rec['accept']):.0%}" if rec["accept"] else "n/a",
                "yes" if all(rec["same"]) else f"NO ({rec['same'].count(False)} of {len(rec['same'])})",
            ]
        )
    body = [
        f"Model: {pkg.name} ({next(iter(models.values())).dims.n_layer} layers x "
        f"{next(iter(models.values())).dims.hidden_size}); batch 1, {a.new_tokens} greedy new tokens (EOS ignored), "
        f"{a.threads} threads; {a.repeat} rounds, each with plain and speculative runs back to back in alternating "
        "order; median decode tok/s and median (min-max) of the per-round ratio. The int8 and int4 variants are not "
        "listed: they round activations to int8, and a multi-token step's kernels differ from a single step's in "
        "the last bits, so their greedy tokens could change and speculation is off for them.",
        results.md_table(
            ["variant", "workload", "plain tok/s", "lookup tok/s", "speed-up", "accepted", "same tokens"],
            table,
        ),
    ]
    ckpt = prepare.WORK / "gpt2-small-random"
    small = prepare.package_dir(ckpt) if (ckpt / "config.json").is_file() else None
    if small is not None and (small / "manifest.json").is_file():
        cost = verify_cost(small, a.threads, a.repeat)
        if cost:
            body += [
                "Cost of one verification step of t tokens relative to one plain decode step, GPT-2-small shape "
                "(the random 124M checkpoint of `run.py`), 32-token context, median:",
                results.md_table(["variant", "plain step ms", "t=2", "t=4", "t=8", "t=12"], cost),
            ]
    text = "\n\n".join(body)
    print(text)
    if not a.no_record:
        results.record(results.per_cpu_kind("Speculative decoding (prompt lookup)"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
