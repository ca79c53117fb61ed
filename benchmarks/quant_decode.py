"""Quantized variants: decode speed vs transformers, peak RSS, and accuracy of the recipes.

    python benchmarks/quant_decode.py                 # speed + RSS on GPT-2-small shape, accuracy on gpt2-ref
    python benchmarks/quant_decode.py --skip-speed    # accuracy table only

Speed: a GPT-2-small-shaped (124M) random checkpoint (speed does not depend on weight values), CPU,
``--threads`` threads, batch 1, a 32-token prompt then 128 greedy tokens. Each engine runs in its own
process (so its peak RSS is its own), rounds alternate between engines, the median is reported, and
every speed is also given as a ratio to transformers ``generate()`` fp32 measured in the same run.
Engines: ``ort-<variant>`` a bare ONNX Runtime loop over the package graph (numpy feeds, present ->
past); ``runtime-<variant>`` ``gpt2deploy.load(...).generate_ids`` when the runtime is installed;
``transformers`` PyTorch eager.

Accuracy: on the real gpt2-ref package, each recipe's top-1 agreement with fp32 and perplexity change
on the evaluation text (non-overlapping windows of the model's context).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
WORK = ROOT / "benchmarks" / ".work" / "quant"


# ----------------------------------------------------------------------------------- workers


def _peak_rss() -> int:
    """This process's RSS high-water mark (VmHWM; ru_maxrss would include the parent's RSS before exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker_ort(path: str, threads: int, prompt: int, new: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    base = _rss()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if os.environ.get("OMP_WAIT_POLICY") == "PASSIVE":  # the same passive waits for ONNX Runtime's pool
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    loaded = _rss()
    past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    heads, head_dim = sess.get_inputs()[3].shape[1], sess.get_inputs()[3].shape[3]
    outs = ["logits"] + [n.replace("past_key_values.", "present.") for n in past_names]
    ids = np.random.default_rng(0).integers(0, 50000, (1, prompt)).astype(np.int64)

    def run():
        past = [np.zeros((1, heads, 0, head_dim), np.float32)] * len(past_names)
        x, length, first = ids, 0, None
        t0 = time.perf_counter()
        for _ in range(new):
            n = x.shape[1]
            feed = {
                "input_ids": x,
                "attention_mask": np.ones((1, length + n), np.int64),
                "position_ids": np.arange(length, length + n)[None],
            }
            feed.update(zip(past_names, past, strict=False))
            r = sess.run(outs, feed)
            x = np.array([[int(r[0][0, -1].argmax())]], np.int64)
            past, length = r[1:], length + n
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        return (new - 1) / (end - first), first - t0

    run()  # warm-up
    tok_s, prefill = run()
    return {
        "decode_tok_s": tok_s,
        "prefill_s": prefill,
        "rss_base": base,
        "rss_loaded": loaded,
        "peak_rss": _peak_rss(),
        "file_size": _size(path),
    }


def worker_runtime(pkg: str, variant: str, threads: int, prompt: int, new: int) -> dict:
    import numpy as np

    import gpt2deploy

    model = gpt2deploy.load(pkg, variant=variant, device="cpu", threads=threads)
    ids = np.random.default_rng(0).integers(0, 50000, prompt).tolist()
    opts = dict(max_new_tokens=new, do_sample=False)
    model.generate_ids([ids], **opts)
    t0 = time.perf_counter()
    res = model.generate_ids([ids], **opts)
    total = time.perf_counter() - t0
    timings = getattr(res, "timings", None) or (res.get("timings") if isinstance(res, dict) else None) or {}
    tok_s = timings.get("decode_tokens_per_s") or timings.get("decode_tok_s")
    return {"decode_tok_s": tok_s or new / total, "total_s": total, "peak_rss": _peak_rss()}


def worker_transformers(ckpt: str, threads: int, prompt: int, new: int) -> dict:
    import torch
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(threads)
    model = GPT2LMHeadModel.from_pretrained(ckpt).eval()
    ids = torch.randint(0, 50000, (1, prompt), generator=torch.Generator().manual_seed(0))
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def gen(n):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t0

    gen(4)
    prefill = min(gen(1) for _ in range(2))
    total = gen(new)
    return {"decode_tok_s": (new - 1) / (total - prefill), "prefill_s": prefill, "peak_rss": _peak_rss()}


def _size(path: str) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.parent.glob(p.name + "*"))


# ----------------------------------------------------------------------------------- setup


def ensure_small(ckpt: Path, pkg: Path) -> None:
    if not (ckpt / "config.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "exporters.synthetic", str(ckpt), "--tokenizer", str(SHARED / "gpt2-tokenizer")],
            check=True,
            cwd=ROOT,
        )
    if not (pkg / "manifest.json").is_file():
        subprocess.run(["gpt2deploy", "export", str(ckpt), "-o", str(pkg)], check=True)


def private_copy(pkg: Path, dst: Path) -> Path:
    """A copy with only the shared files and fp32, so quantizing never touches a package others use."""
    manifest = json.loads((pkg / "manifest.json").read_text())
    if dst.is_dir():
        mine = json.loads((dst / "manifest.json").read_text())
        if mine["variants"]["fp32"]["files"] == manifest["variants"]["fp32"]["files"]:
            return dst
        shutil.rmtree(dst)
    keep = [e["path"] for e in manifest["files"].values()] + [e["path"] for e in manifest["variants"]["fp32"]["files"]]
    for rel in keep:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pkg / rel, dst / rel)
    manifest["variants"] = {"fp32": manifest["variants"]["fp32"]}
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


def ensure_variants(pkg: Path, modes=("int8", "int4")) -> None:
    from gpt2deploy.quantizing import quantize_package

    manifest = json.loads((pkg / "manifest.json").read_text())
    for mode in modes:
        if mode not in manifest["variants"]:
            t0 = time.perf_counter()
            quantize_package(pkg, mode)
            print(f"quantized {mode} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)


def _spawn(args: list[str]) -> dict:
    # Passive OpenMP waits: spinning PyTorch threads lose badly to any other load on the machine (a
    # decode step's tiny ops each pay the wake-up), which would flatter every ratio to transformers.
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def extra_graphs(pkg: Path) -> dict:
    """Other recipes, as bare graphs beside the package (not variants), for speed comparisons."""
    import copy

    import quant.graph as qgraph
    from quant.int8 import quantize_int8
    from quant.nbits import quantize_nbits
    from quant.optimize import optimize

    builders = {
        "int8-per-channel": lambda m: quantize_int8(m, per_channel=True),
        "int4-head4": lambda m: quantize_nbits(m, head_bits=4),
        "int4-head4-int8-embedding": lambda m: quantize_nbits(m, head_bits=4, embedding="int8"),
        "int4-level0": lambda m: quantize_nbits(m, accuracy_level=0),
        "nbits8": lambda m: quantize_nbits(m, bits=8),
    }
    out, optimized = {}, None
    dims = json.loads((pkg / "manifest.json").read_text())["model"]
    for name, build in builders.items():
        path = pkg.parent / "recipes" / f"{name}.onnx"
        if not path.is_file():
            if optimized is None:
                optimized, _ = optimize(qgraph.load(pkg / "onnx" / "model.onnx"), dims["n_head"], dims["hidden_size"])
            path.parent.mkdir(parents=True, exist_ok=True)
            model, _ = build(copy.deepcopy(optimized))
            qgraph.save(model, path)
        out[name] = path
    return out


def speed(args) -> dict:
    ensure_small(args.ckpt, args.pkg)
    pkg = private_copy(args.pkg, WORK / "small-pkg")
    ensure_variants(pkg)
    manifest = json.loads((pkg / "manifest.json").read_text())
    engines = {f"ort-{v}": ["ort", str(pkg / manifest["variants"][v]["file"])] for v in ("fp32", "int8", "int4")}
    if args.recipes:
        for name, path in extra_graphs(pkg).items():
            engines[f"ort-{name}"] = ["ort", str(path)]
    engines["transformers"] = ["transformers", str(args.ckpt)]
    try:
        from gpt2deploy.runtime import model as _runtime  # noqa: F401

        for v in ("fp32", "int8", "int4"):
            engines[f"runtime-{v}"] = ["runtime", str(pkg), v]
    except ImportError:
        pass
    common = [str(args.threads), str(args.prompt), str(args.new)]
    runs: dict[str, list[dict]] = {k: [] for k in engines}
    for r in range(args.rounds):
        for name, spec in engines.items():
            res = _spawn([*spec, *common])
            runs[name].append(res)
            print(f"round {r + 1} {name}: {res.get('decode_tok_s', res.get('error'))}", file=sys.stderr)
    table = {}
    for name, rs in runs.items():
        ok = [x for x in rs if "decode_tok_s" in x]
        if not ok:
            table[name] = {"error": rs[-1].get("error")}
            continue
        row = {
            "decode_tok_s": statistics.median(x["decode_tok_s"] for x in ok),
            "peak_rss": max(x["peak_rss"] for x in ok),
        }
        for key in ("file_size", "rss_base", "rss_loaded"):
            if key in ok[0]:
                row[key] = ok[0][key]
        table[name] = row
    base = table.get("transformers", {}).get("decode_tok_s")
    for row in table.values():
        if base and "decode_tok_s" in row:
            row["x_transformers"] = row["decode_tok_s"] / base
        if "file_size" in row:
            row["peak_rss_over_file"] = row["peak_rss"] / row["file_size"]
            row["model_rss_over_file"] = (row["rss_loaded"] - row["rss_base"]) / row["file_size"]
    return table


# ----------------------------------------------------------------------------------- accuracy


def recipes():
    from quant.int8 import quantize_int8
    from quant.nbits import quantize_nbits

    return {
        "int8 default: per-tensor, shared per-row tied table": lambda m: quantize_int8(m),
        "int8 --per-channel": lambda m: quantize_int8(m, per_channel=True),
        "int8 plain: per-tensor, untied lm_head, 8-bit embedding": lambda m: quantize_int8(
            m, share_embedding=False, quantize_embedding=True
        ),
        "MatMulNBits 8-bit, block 32": lambda m: quantize_nbits(m, bits=8),
        "int4 default: block 32, 8-bit lm_head shared with embedding": lambda m: quantize_nbits(m),
        "int4 --head-bits 4 (all 4-bit, shared table)": lambda m: quantize_nbits(m, head_bits=4),
        "int4 4-bit lm_head + separate int8 embedding": lambda m: quantize_nbits(m, head_bits=4, embedding="int8"),
        "int4 default with accuracy_level 0": lambda m: quantize_nbits(m, accuracy_level=0),
    }


def accuracy(args) -> dict:
    import copy

    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    import quant.graph as qgraph
    from gpt2deploy.package import Package
    from quant.optimize import optimize

    pkg = Package.open(args.ref)
    d = pkg.dims
    ids = Tokenizer.from_file(str(pkg.tokenizer_path)).encode(Path(args.text).read_text(encoding="utf-8")).ids
    window = min(d.n_positions, 512)
    chunks = [ids[i : i + window] for i in range(0, len(ids) - window + 1, window)][: args.windows]

    def nll(logits, c):
        lg = logits[:-1].astype(np.float64)
        m = lg.max(1, keepdims=True)
        lse = np.log(np.exp(lg - m).sum(1)) + m[:, 0]
        return float((lse - lg[np.arange(len(c) - 1), c[1:]]).sum())

    def run(path):
        """Per window: the argmax tokens and the summed NLL (full logits would not fit in memory)."""
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        empty = {
            f"past_key_values.{i}.{k}": np.zeros((1, d.n_head, 0, d.head_dim), np.float32)
            for i in range(d.n_layer)
            for k in ("key", "value")
        }
        tops, total = [], 0.0
        for c in chunks:
            x = np.array([c], np.int64)
            logits = sess.run(
                ["logits"],
                {"input_ids": x, "attention_mask": np.ones_like(x), "position_ids": np.arange(len(c))[None], **empty},
            )[0][0]
            tops.append(logits.argmax(-1))
            total += nll(logits, c)
        return np.concatenate(tops), total

    ref_top, ref_nll = run(pkg.variant_path("fp32"))
    n = sum(len(c) - 1 for c in chunks)
    ppl_ref = float(np.exp(ref_nll / n))
    optimized, _ = optimize(qgraph.load(pkg.variant_path("fp32")), d.n_head, d.hidden_size)
    table = {"_reference": {"tokens": len(chunks) * window, "ppl_fp32": ppl_ref}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in recipes().items():
            model, info = fn(copy.deepcopy(optimized))
            path = Path(tmp) / "variant.onnx"
            qgraph.save(model, path)
            top, total = run(path)
            agree = float(np.mean(top == ref_top))
            ppl = float(np.exp(total / n))
            table[name] = {
                "top1": agree,
                "ppl": ppl,
                "ppl_delta": ppl / ppl_ref - 1,
                "size_mb": path.stat().st_size / 1e6,
            }
            print(
                f"{name}: top-1 {agree * 100:.1f}%, ppl {ppl_ref:.2f} -> {ppl:.2f} ({(ppl / ppl_ref - 1) * 100:+.2f}%)",
                file=sys.stderr,
            )
    return table


# ----------------------------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, *rest = sys.argv[2:]
        if kind == "ort":
            res = worker_ort(rest[0], *map(int, rest[1:]))
        elif kind == "runtime":
            res = worker_runtime(rest[0], rest[1], *map(int, rest[2:]))
        else:
            res = worker_transformers(rest[0], *map(int, rest[1:]))
        print(json.dumps(res))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=Path("/tmp/small-ckpt"))
    p.add_argument("--pkg", type=Path, default=Path("/tmp/small-pkg"))
    p.add_argument("--ref", type=Path, default=Path("/tmp/ref-pkg"))
    p.add_argument("--text", type=Path, default=SHARED / "eval-text" / "pydoc_topics.txt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--windows", type=int, default=64, help="evaluation windows for accuracy (context-sized)")
    p.add_argument(
        "--recipes", action="store_true", help="also time other recipes (per-channel int8, int4 8-bit head, ...)"
    )
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    results = {}
    if not args.skip_accuracy:
        results["accuracy"] = accuracy(args)
    if not args.skip_speed:
        results["speed"] = speed(args)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    _record(results)


def _record(results: dict) -> None:
    """The recipe comparison as the ``Recipes`` section of benchmarks/RESULTS.md."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from results import md_table, record

    parts = []
    acc = {k: v for k, v in results.get("accuracy", {}).items() if not k.startswith("_")}
    if acc:
        rows = [
            [n, f"{r['top1'] * 100:.2f}%", f"{r['ppl_delta'] * 100:+.2f}%", f"{r['size_mb']:.1f}"]
            for n, r in acc.items()
        ]
        parts.append("Accuracy on gpt2-ref vs fp32:\n\n" + md_table(["recipe", "top-1", "ppl", "file MB"], rows))
    speed = results.get("speed")
    if speed:
        rows = [
            [n, *(r.get(k, "") for k in ("decode_tok_s", "peak_rss"))] for n, r in speed.items() if isinstance(r, dict)
        ]
        parts.append(
            "Decode speed, GPT-2-small shape (medians):\n\n" + md_table(["engine", "decode tok/s", "peak RSS"], rows)
        )
    if parts:
        record("Recipes", "\n\n".join(parts))


if __name__ == "__main__":
    main()
