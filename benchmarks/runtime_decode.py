"""Runtime decode speed: gpt2deploy's generation loop vs transformers ``generate()``, and decode speed far into
the context vs near its start. Every number is a ratio of measurements interleaved in this one run.

    python benchmarks/runtime_decode.py [--ckpt /tmp/small-ckpt] [--pkg /tmp/small-pkg] [--threads 2]
        [--prompt-tokens 32] [--new-tokens 128] [--far 896] [--far-steps 32] [--repeat 5]
        [--variants fp32,int8,int4] [--fused-attention] [--json OUT]

Defaults: a GPT-2-small-shaped (124M) random checkpoint (written with ``python -m exporters.synthetic`` and
exported with ``gpt2deploy export`` when absent), the fp32 variant, batch 1, greedy, EOS ignored.

1. Decode tok/s (the new tokens after the first, over the time of those decode steps) of
   ``model.generate_ids`` vs transformers ``GPT2LMHeadModel.generate()`` with the same prompt, both
   2 threads. transformers' decode time is its 128-token call minus its 1-token call (the prompt step).
2. Decode tok/s over positions far..far+steps vs prompt..prompt+steps (same number of steps).
3. Per-step Python overhead of the loop: decode time outside ``session.run`` per step.
4. With ``--variants``: decode tok/s of each variant present (to order CPU variant auto-selection).
5. With ``--fused-attention``: the same measurements on a copy of the package whose fp32 graph has each
   layer's attention fused into one MultiHeadAttention node (``quant.attention``, same graph I/O). The
   exported graph copies the whole cache twice per step (Concat of past and new, then a Transpose of K);
   the fused kernel does neither, which is what keeps decode speed flat far into the context.

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
        subprocess.run(
            [sys.executable, "-m", "exporters.synthetic", str(ckpt), "--tokenizer", str(TOKENIZER)],
            check=True,
            cwd=ROOT,
        )
    if not (pkg / "manifest.json").is_file():
        print(f"exporting {ckpt} to {pkg}", file=sys.stderr)
        subprocess.run(["gpt2deploy", "export", str(ckpt), "-o", str(pkg)], check=True)


def fused_copy(pkg: Path, out: Path) -> Path:
    """``out``: ``pkg`` with its fp32 graph attention-fused (MultiHeadAttention), manifest hashes updated."""
    if (out / "manifest.json").is_file():
        return out
    import shutil

    import onnx

    from gpt2deploy.fsutil import staged_dir
    from gpt2deploy.manifest import variant_entry
    from gpt2deploy.package import Package
    from quant.attention import fuse_attention

    src = Package.open(pkg)
    d = src.dims
    with staged_dir(out) as tmp:
        for f in pkg.iterdir():
            if f.is_file():
                shutil.copyfile(f, tmp / f.name)
        (tmp / "onnx").mkdir()
        fused, report = fuse_attention(onnx.load(str(src.variant_path("fp32"))), d.n_head, d.hidden_size)
        if report["fused"] != d.n_layer:
            raise SystemExit(f"attention fusion matched {report['fused']} of {d.n_layer} layers: {report['unmatched']}")
        onnx.save(fused, str(tmp / "onnx" / "model.onnx"))
        manifest = json.loads((tmp / "manifest.json").read_text())
        old = manifest["variants"]["fp32"]
        manifest["variants"] = {
            "fp32": variant_entry(
                tmp,
                "fp32",
                ["onnx/model.onnx"],
                "fp32",
                old["opset"],
                dict(old["recipe"], fused={"MultiHeadAttention": report["fused"]}),
                old["providers"],
            )
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def prompt_ids(n: int, seed: int = 0, vocab: int = 50000) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(100, vocab, size=n).tolist()


def ours_decode(model, prompt: list[int], new: int) -> dict:
    r = model.generate_ids([prompt], max_new_tokens=new, ignore_eos=True)
    t = r.timings
    assert len(r.tokens[0]) == new
    return {
        "tok_s": t["decode_tokens_per_second"],
        "overhead_ms": t["overhead_ms_per_step"],
        "prefill_s": t["prefill_seconds"],
    }


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
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
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
    ap.add_argument(
        "--fused-attention", action="store_true", help="also measure an attention-fused copy of the fp32 graph"
    )
    ap.add_argument("--fused-pkg", default=None, help="where that copy lives (default: PKG + '-mha')")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    ckpt, pkg = Path(a.ckpt), Path(a.pkg)
    ensure_package(ckpt, pkg)

    import gpt2deploy

    models = {"exported": gpt2deploy.load(pkg, variant=a.variant, device="cpu", threads=a.threads)}
    if a.fused_attention:
        fpkg = fused_copy(pkg, Path(a.fused_pkg or str(pkg) + "-mha"))
        models["fused"] = gpt2deploy.load(fpkg, variant="fp32", device="cpu", threads=a.threads)
    hf = None if a.no_transformers else HF(ckpt, a.threads)
    prompt = prompt_ids(a.prompt_tokens)
    far_prompt = prompt_ids(a.far, seed=1)
    near_prompt = prompt_ids(a.prompt_tokens, seed=2)
    for m in models.values():  # warm-up
        ours_decode(m, prompt, 8)
        ours_decode(m, far_prompt, 4)
    if hf:
        hf.decode(prompt, 4)
    rows: dict[str, list] = {"hf": []}
    for k in models:
        rows.update(
            {
                f"{k}:decode": [],
                f"{k}:near": [],
                f"{k}:far": [],
                f"{k}:overhead_ms": [],
                f"{k}:near_overhead_ms": [],
                f"{k}:far_overhead_ms": [],
            }
        )
    tasks = [("hf", None)] + [(k, w) for k in models for w in ("decode", "near", "far")]
    for rep in range(a.repeat):
        for key, what in tasks if rep % 2 == 0 else tasks[::-1]:
            if key == "hf":
                if hf:
                    rows["hf"].append(hf.decode(prompt, a.new_tokens)["tok_s"])
                continue
            m = models[key]
            if what == "decode":
                r = ours_decode(m, prompt, a.new_tokens)
                rows[f"{key}:decode"].append(r["tok_s"])
                rows[f"{key}:overhead_ms"].append(r["overhead_ms"])
            else:
                p = near_prompt if what == "near" else far_prompt
                r = ours_decode(m, p, a.far_steps + 1)
                rows[f"{key}:{what}"].append(r["tok_s"])
                rows[f"{key}:{what}_overhead_ms"].append(r["overhead_ms"])
        parts = []
        for k in models:
            d, n, f = rows[f"{k}:decode"][-1], rows[f"{k}:near"][-1], rows[f"{k}:far"][-1]
            vs = f" (x{d / rows['hf'][-1]:.2f} transformers)" if hf else ""
            parts.append(f"{k} {d:.1f} tok/s{vs}, pos {a.far}/{a.prompt_tokens} {f / n:.0%}")
        hf_part = f"transformers {rows['hf'][-1]:.1f} tok/s; " if hf else ""
        print(f"round {rep + 1}/{a.repeat}: {hf_part}" + "; ".join(parts), file=sys.stderr)

    report = {
        "package": str(pkg),
        "variant": a.variant,
        "threads": a.threads,
        "prompt_tokens": a.prompt_tokens,
        "new_tokens": a.new_tokens,
        "near_position": a.prompt_tokens,
        "far_position": a.far,
        "transformers_decode_tok_s": med(rows["hf"]) if hf else None,
        "graphs": {},
    }
    for k in models:
        g = {
            "decode_tok_s": med(rows[f"{k}:decode"]),
            "speedup_vs_transformers": med([o / h for o, h in zip(rows[f"{k}:decode"], rows["hf"], strict=False)])
            if hf
            else None,
            "near_decode_tok_s": med(rows[f"{k}:near"]),
            "far_decode_tok_s": med(rows[f"{k}:far"]),
            "far_over_near": med([f / n for f, n in zip(rows[f"{k}:far"], rows[f"{k}:near"], strict=False)]),
            "overhead_ms_per_step": med(rows[f"{k}:overhead_ms"]),
            # the loop's own time per step (outside session.run) near and far: flat when nothing grows with context
            "overhead_ms_per_step_near_far": [med(rows[f"{k}:near_overhead_ms"]), med(rows[f"{k}:far_overhead_ms"])],
            "best_decode_tok_s": max(rows[f"{k}:decode"]),
            "best_far_over_near": max(rows[f"{k}:far"]) / max(rows[f"{k}:near"]),
        }
        report["graphs"][k] = g
    if a.variants:
        names = [v for v in a.variants.split(",") if v]
        vmodels = {}
        for v in names:
            try:
                vmodels[v] = gpt2deploy.load(pkg, variant=v, device="cpu", threads=a.threads)
            except gpt2deploy.errors.Gpt2DeployError as e:  # absent variant
                print(f"{v}: {e}", file=sys.stderr)
        speeds = {v: [] for v in vmodels}
        for m in vmodels.values():
            ours_decode(m, prompt, 8)
        for rep in range(a.repeat):
            for v in list(vmodels) if rep % 2 == 0 else list(vmodels)[::-1]:
                speeds[v].append(ours_decode(vmodels[v], prompt, a.new_tokens)["tok_s"])
        report["variants"] = {v: med(s) for v, s in speeds.items()}
        print(
            "variants decode tok/s: " + ", ".join(f"{v} {s:.1f}" for v, s in report["variants"].items()),
            file=sys.stderr,
        )
    report["samples"] = rows
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
