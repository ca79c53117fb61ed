"""Decode speed of a package's GroupQueryAttention variants in the portable input schema (ONNX Runtime 1.22's,
11 inputs, what ``quant.attention`` writes) vs the same graphs with the per-row query lengths input of 1.32
(17 inputs), interleaved in one run on the installed onnxruntime.

    python benchmarks/gqa_schema_ab.py PACKAGE [--variants int8,int4] [--new-tokens 128] [--repeat 5] [--record]

The 17-input copy is made in a temporary directory (graph rewritten, weights linked); both are loaded with the
same thread count and decode the same prompt, greedy, EOS ignored. Reported: median decode tok/s of each and
their ratio; the greedy tokens must be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def with_query_lengths(pkg: Path, out: Path, variants: list[str]) -> None:
    """Copy ``pkg`` to ``out`` with each GQA node given input 16 (query lengths = the step width per row)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    shutil.copytree(pkg, out, copy_function=os.link)
    manifest = json.loads((pkg / "manifest.json").read_text())
    for name in variants:
        rel = manifest["variants"][name]["file"]
        path = out / rel
        model = onnx.load(str(pkg / rel), load_external_data=False)
        graph = model.graph
        p = "ab_query_lengths"
        graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), f"{p}_s0"))
        graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), f"{p}_s1"))
        nodes = [
            helper.make_node("Shape", ["attention_mask"], [f"{p}_mask_shape"], name=f"{p}_0"),
            helper.make_node("Slice", [f"{p}_mask_shape", f"{p}_s0", f"{p}_s1"], [f"{p}_batch"], name=f"{p}_1"),
            helper.make_node("Shape", ["input_ids"], [f"{p}_ids"], start=1, end=2, name=f"{p}_2"),
            helper.make_node("Cast", [f"{p}_ids"], [f"{p}_seq32"], to=TensorProto.INT32, name=f"{p}_3"),
            helper.make_node("Expand", [f"{p}_seq32", f"{p}_batch"], [p], name=f"{p}_4"),
        ]
        for k, n in enumerate(nodes):
            graph.node.insert(k, n)
        for n in graph.node:
            if n.op_type == "GroupQueryAttention":
                n.input.extend([""] * (16 - len(n.input)) + [p])
        path.unlink()
        onnx.save(model, str(path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--variants", default="int8,int4")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)

    import onnxruntime

    import gpt2deploy

    variants = [v for v in args.variants.split(",") if v]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "pkg17"
        with_query_lengths(args.package, old, variants)
        for name in variants:
            models = {
                "11 inputs (1.22 schema)": gpt2deploy.load(args.package, variant=name, threads=args.threads),
                "17 inputs (1.32 schema)": gpt2deploy.load(old, variant=name, threads=args.threads, verify=False),
            }
            ids = [(list(range(1000, 1000 + args.prompt_tokens)))]
            speeds: dict[str, list[float]] = {k: [] for k in models}
            tokens = {}
            for _ in range(args.repeat):
                for label, model in models.items():
                    r = model.generate_ids(ids, max_new_tokens=args.new_tokens, do_sample=False, ignore_eos=True)
                    speeds[label].append(r.timings["decode_tokens_per_second"])
                    tokens[label] = r.tokens[0]
            same = len({tuple(t) for t in tokens.values()}) == 1
            med = {k: statistics.median(v) for k, v in speeds.items()}
            new, ref = med["11 inputs (1.22 schema)"], med["17 inputs (1.32 schema)"]
            rows.append([name, f"{ref:.1f}", f"{new:.1f}", f"{new / ref:.3f}", "yes" if same else "NO"])
            print(
                f"{name}: 17-input {ref:.1f} tok/s, 11-input {new:.1f} tok/s, ratio {new / ref:.3f}, same tokens {same}"
            )
    header = ["variant", "17-input GQA tok/s", "11-input GQA tok/s", "ratio 11/17", "greedy tokens equal"]
    if args.record:
        from benchmarks.results import md_table, record

        body = (
            f"onnxruntime {onnxruntime.__version__}, {args.threads} threads, batch 1, prompt {args.prompt_tokens}, "
            f"{args.new_tokens} new tokens, median of {args.repeat} interleaved runs, package {args.package.name}\n\n"
            + md_table(header, rows)
        )
        record(
            "GroupQueryAttention input schema A-B",
            body,
            "python benchmarks/gqa_schema_ab.py " + " ".join(argv or sys.argv[1:]),
        )
    return 0 if all(r[-1] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
