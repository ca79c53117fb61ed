"""Runtime decode speed: gpt2deploy's generation loop vs transformers ``generate()``, and decode speed far into
the context vs near its start. Every number is a ratio of measurements interleaved in this one run.

    python benchmarks/runtime_decode.py [--ckpt /tmp/small-ckpt] [--pkg /tmp/small-pkg] [--threads 2]
        [--prompt-tokens 32] [--new-tokens 128] [--far 896] [--far-steps 32] [--repeat 5]
        [--variants fp32,int8,int4] [--json OUT]

Defaults: a GPT-2-small-shaped (124M) random checkpoint (written with ``python -m exporters.synthetic`` and
exported with ``gpt2deploy export`` when absent), the fp32 variant, batch 1, greedy, EOS ignored.

1. Decode tok/s (the new tokens after the first, over the time of those decode steps) of
   ``model.generate_ids`` vs transformers ``GPT2LMHeadModel.generate()`` with the same prompt, both
   2 threads. transformers' decode time is its 128-token call minus its 1-token call (the prompt step).
2. Decode tok/s over positions far..far+steps vs prompt..prompt+steps (same number of steps).
3. Per-step Python overhead of the loop: decode time outside ``session.run`` per step.
4. With ``--variants``: decode tok/s of each variant present (to order CPU variant auto-selection).

Runs alternate between the engines/positions and repeat; medians are reported. The machine may be shared,
so look at the ratios, not the absolute numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT.parent / "shared" / "gpt2-tokenizer"


def ensure_package(ckpt: Path, pkg: Path) -> None:
    if not (ckpt / "config.json").is_file():
        print(f"writing a GPT-2-small-shaped random checkpoint to {ckpt}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "exporters.synthetic", str(ckpt), "--tokenizer", str(TOKENIZER)], check=True, cwd=ROOT)
    if not (pkg / "manifest.json").is_file():
        print(f"exporting {ckpt} to {pkg}", file=sys.stderr)
        subprocess.run(["gpt2deploy", "export", str(ckpt), "-o", str(pkg)], check=True)


def prompt_ids(n: int, seed: int = 0, vocab: int = 50000) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(100, vocab, size=n).tolist()


def ours_decode(model, prompt: list[int], new: int) -> dict:
    r = model.generate_ids([prompt], max_new_tokens=new, ignore_eos=True)
    t = r.timings
    assert len(r.tokens[0]) == new
    return {"tok_s": t["decode_tokens_per_second"], "overhead_ms": t["overhead_ms_per_step"], "prefill_s": t["prefill_seconds"]}


class HF:
    def __init__(self, ckpt: Path, threads: int):
        import torch
        from transformers import GPT2LMHeadModel

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = GPT2LMHeadModel.from_pretrained(ckpt).eval()

    def _gen(self, ids, new: int) -> float:
        torch = self.torch
        with torch.inference_mode():
            t = time.perf_counter()
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                      do_sample=False, pad_token_id=0)
            dt = time.perf_counter() - t
        assert out.shape[1] == ids.shape[1] + new
        return dt

    def decode(self, prompt: list[int], new: int) -> dict:
        ids = self.torch.tensor([prompt])
        first = self._gen(ids, 1)
        full = self._gen(ids, new)
        return {"tok_s": (new - 1) / max(full - first, 1e-9), "prefill_s": first}


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="/tmp/small-ckpt")
    ap.add_argument("--pkg", default="/tmp/small-pkg")
    ap.add_argument("--variant", default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--far", type=int, default=896, help="prompt length for the far-position measurement")
    ap.add_argument("--far-steps", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--variants", default="", help="also compare these variants' decode speed (comma list)")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    ckpt, pkg = Path(a.ckpt), Path(a.pkg)
    ensure_package(ckpt, pkg)

    import gpt2deploy

    model = gpt2deploy.load(pkg, variant=a.variant, device="cpu", threads=a.threads)
    hf = None if a.no_transformers else HF(ckpt, a.threads)
    prompt = prompt_ids(a.prompt_tokens)
    far_prompt = prompt_ids(a.far, seed=1)
    near_prompt = prompt_ids(a.prompt_tokens, seed=2)
    # warm-up
    ours_decode(model, prompt, 8)
    ours_decode(model, far_prompt, 4)
    if hf:
        hf.decode(prompt, 4)
    rows = {"ours": [], "hf": [], "near": [], "far": [], "overhead_ms": []}
    for rep in range(a.repeat):
        order = ["ours", "hf", "near", "far"] if rep % 2 == 0 else ["far", "near", "hf", "ours"]
        for what in order:
            if what == "ours":
                r = ours_decode(model, prompt, a.new_tokens)
                rows["ours"].append(r["tok_s"])
                rows["overhead_ms"].append(r["overhead_ms"])
            elif what == "hf" and hf:
                rows["hf"].append(hf.decode(prompt, a.new_tokens)["tok_s"])
            elif what == "near":
                rows["near"].append(ours_decode(model, near_prompt, a.far_steps + 1)["tok_s"])
            elif what == "far":
                rows["far"].append(ours_decode(model, far_prompt, a.far_steps + 1)["tok_s"])
        line = f"round {rep + 1}/{a.repeat}: ours {rows['ours'][-1]:.1f} tok/s"
        if hf:
            line += f", transformers {rows['hf'][-1]:.1f} tok/s (x{rows['ours'][-1] / rows['hf'][-1]:.2f})"
        line += f", pos {a.prompt_tokens}: {rows['near'][-1]:.1f}, pos {a.far}: {rows['far'][-1]:.1f} tok/s ({rows['far'][-1] / rows['near'][-1]:.0%})"
        print(line, file=sys.stderr)
    report = {
        "package": str(pkg),
        "variant": model.variant,
        "threads": a.threads,
        "prompt_tokens": a.prompt_tokens,
        "new_tokens": a.new_tokens,
        "ours_decode_tok_s": med(rows["ours"]),
        "transformers_decode_tok_s": med(rows["hf"]) if hf else None,
        "speedup_vs_transformers": (med([o / h for o, h in zip(rows["ours"], rows["hf"])]) if hf else None),
        "near_position": a.prompt_tokens,
        "far_position": a.far,
        "near_decode_tok_s": med(rows["near"]),
        "far_decode_tok_s": med(rows["far"]),
        "far_over_near": med([f / n for f, n in zip(rows["far"], rows["near"])]),
        "overhead_ms_per_step": med(rows["overhead_ms"]),
        "samples": rows,
    }
    if a.variants:
        names = [v for v in a.variants.split(",") if v]
        models = {}
        for v in names:
            try:
                models[v] = gpt2deploy.load(pkg, variant=v, device="cpu", threads=a.threads)
            except gpt2deploy.errors.Gpt2DeployError as e:  # absent variant
                print(f"{v}: {e}", file=sys.stderr)
        speeds = {v: [] for v in models}
        for v, m in models.items():
            ours_decode(m, prompt, 8)
        for rep in range(a.repeat):
            for v in (list(models) if rep % 2 == 0 else list(models)[::-1]):
                speeds[v].append(ours_decode(models[v], prompt, a.new_tokens)["tok_s"])
        report["variants"] = {v: med(s) for v, s in speeds.items()}
        print("variants decode tok/s: " + ", ".join(f"{v} {s:.1f}" for v, s in report["variants"].items()), file=sys.stderr)
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
