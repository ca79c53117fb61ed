"""Decode and prefill speed of a package's graph with and without attention fusion, same run.

    python benchmarks/attention_fusion.py PACKAGE [--threads 2] [--positions 32,900] [--steps 32]
        [--precisions fp32,int8] [--ops MultiHeadAttention,GroupQueryAttention] [--reps 3] [--json OUT]

For each precision it builds the unfused graph (the project's optimize pipeline without its attention
step, then for int8 the project's INT8 recipe) and, from the same optimized graph, one fused graph per
attention op. Each is timed on the CPU provider: ``steps`` greedy-shaped decode steps (batch 1, one
token, present fed back as past) starting at each past length, and a prefill of ``position`` tokens.
Repetitions are interleaved across graphs so background load hits all of them alike; the best
repetition is reported (the median too), with each fused graph's speed as a ratio of the unfused one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _optimize(model, num_heads: int, hidden: int):
    """The project's optimization pipeline without attention fusion (ORT's optimizer if it is absent)."""
    try:
        from quant.optimize import optimize

        return optimize(model, num_heads, hidden, fuse_attention=False)[0]
    except ImportError:
        from onnxruntime.transformers.optimizer import optimize_model

        return optimize_model(model, model_type="gpt2", num_heads=num_heads, hidden_size=hidden, opt_level=0).model


def _untie_lm_head(model):
    try:
        from quant.lm_head import untie_lm_head

        return untie_lm_head(model)[0]
    except ImportError:
        from onnx import numpy_helper

        inits = {t.name: t for t in model.graph.initializer}
        prods = {o: n for n in model.graph.node for o in n.output}
        for node in model.graph.node:
            tr = prods.get(node.input[1]) if node.op_type == "MatMul" else None
            if tr is not None and tr.op_type == "Transpose" and tr.input[0] in inits:
                name = tr.input[0] + "_transposed"
                if name not in inits:
                    w = numpy_helper.to_array(inits[tr.input[0]]).T
                    inits[name] = numpy_helper.from_array(np.ascontiguousarray(w), name)
                    model.graph.initializer.append(inits[name])
                node.input[1] = name
        return model


def _int8(model, workdir: Path, tag: str):
    """The project's INT8 recipe (dynamic quantization, lm_head included); plain quantize_dynamic if absent."""
    import onnx
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = workdir / f"{tag}_f.onnx", workdir / f"{tag}_q.onnx"
    try:
        from quant.int8 import quantize_int8
    except ImportError:
        quantize_int8 = None
    if quantize_int8 is not None:
        onnx.save(quantize_int8(model)[0], str(dst))
        return dst
    onnx.save(_untie_lm_head(model), str(src))
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"],
        extra_options={"DefaultTensorType": TensorProto.FLOAT},
    )
    src.unlink()
    return dst


def build_graphs(package: Path, precisions, ops, workdir: Path, log, reuse: bool = False) -> dict:
    import onnx

    from gpt2deploy.package import Package
    from quant.attention import fuse_attention

    pkg = Package.open(package)
    d = pkg.dims
    base = _optimize(onnx.load(str(pkg.variant_path("fp32"))), d.n_head, d.hidden_size)
    graphs = {}
    variants = {"unfused": base}
    for op in ops:
        fused, report = fuse_attention(base, d.n_head, d.hidden_size, op=op)
        if report["fused"] != d.n_layer:
            raise SystemExit(f"error: {op}: fused {report['fused']} of {d.n_layer} layers: {report['unmatched']}")
        variants[op] = fused
        log(f"{op}: fused {report['fused']} layers, nodes {report['nodes_before']} -> {report['nodes_after']}")
    for prec in precisions:
        for name, model in variants.items():
            path = workdir / f"{prec}_{name}.onnx"
            if path.is_file() and reuse:
                graphs[(prec, name)] = path
                log(f"reusing {path}")
                continue
            if prec == "fp32":
                onnx.save(model, str(path))
            else:
                copy = onnx.ModelProto()
                copy.CopyFrom(model)
                path = _int8(copy, workdir, f"{prec}_{name}")
                path = path.replace(workdir / f"{prec}_{name}.onnx")
            graphs[(prec, name)] = path
            log(f"built {prec}/{name} ({path.stat().st_size / 1e6:.0f} MB)")
    return graphs


class Runner:
    def __init__(self, path: Path, dims, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.d = dims
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def _feed(self, ids, past, total):
        batch, seq = ids.shape
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((batch, total), np.int64),
            "position_ids": np.arange(total - seq, total, dtype=np.int64)[None].repeat(batch, 0),
        }
        for i in range(self.d.n_layer):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        return feed

    def decode(self, position: int, steps: int, rng) -> float:
        """Seconds per decode step starting from a past of ``position`` tokens."""
        d = self.d
        past = [
            rng.standard_normal((1, d.n_head, position, d.head_dim), dtype=np.float32) for _ in range(2 * d.n_layer)
        ]
        ids = np.array([[11]], np.int64)
        self.sess.run(self.outputs, self._feed(ids, past, position + 1))  # warm-up at this length
        t0 = time.perf_counter()
        for k in range(steps):
            out = self.sess.run(self.outputs, self._feed(ids, past, position + k + 1))
            past = out[1:]
            ids = out[0][:, -1:].argmax(-1).astype(np.int64)
        return (time.perf_counter() - t0) / steps

    def prefill(self, length: int, rng) -> float:
        d = self.d
        past = [np.zeros((1, d.n_head, 0, d.head_dim), np.float32) for _ in range(2 * d.n_layer)]
        ids = rng.integers(0, 1000, (1, length)).astype(np.int64)
        self.sess.run(self.outputs, self._feed(ids, past, length))  # warm-up at this length
        t0 = time.perf_counter()
        self.sess.run(self.outputs, self._feed(ids, past, length))
        return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--positions", default="32,900")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--ops", default="MultiHeadAttention,GroupQueryAttention")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--build-only", action="store_true", help="build the graphs (into --workdir) and stop")
    ap.add_argument(
        "--workdir", type=Path, default=None, help="keep the built graphs here and reuse them on the next run"
    )
    args = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    from gpt2deploy.package import Package

    dims = Package.open(args.package).dims
    positions = [int(p) for p in args.positions.split(",")]
    if max(positions) + args.steps + 1 > dims.n_positions:
        raise SystemExit(
            f"error: position {max(positions)} + {args.steps} steps exceeds the context {dims.n_positions}; pass "
            "smaller --positions"
        )
    precisions = args.precisions.split(",")
    ops = [o for o in args.ops.split(",") if o]
    results: dict = {"threads": args.threads, "steps": args.steps, "reps": args.reps, "results": {}}
    with tempfile.TemporaryDirectory(prefix="attn-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        graphs = build_graphs(args.package, precisions, ops, workdir, log, reuse=args.workdir is not None)
        if args.build_only:
            return 0
        for prec in precisions:
            names = ["unfused", *ops]
            runners = {n: Runner(graphs[(prec, n)], dims, args.threads) for n in names}
            table: dict = {n: {} for n in names}
            for pos in positions:
                dec = {n: [] for n in names}
                pre = {n: [] for n in names}
                for rep in range(args.reps):
                    for n in names:  # interleaved
                        rng = np.random.default_rng(rep)
                        dec[n].append(runners[n].decode(pos, args.steps, rng))
                        pre[n].append(runners[n].prefill(pos, rng))
                for n in names:  # best-of-reps: least disturbed by other processes on the machine
                    table[n][pos] = {
                        "decode_tok_s": 1.0 / min(dec[n]),
                        "prefill_s": min(pre[n]),
                        "decode_tok_s_median": 1.0 / statistics.median(dec[n]),
                        "prefill_s_median": statistics.median(pre[n]),
                    }
                base = table["unfused"][pos]
                for n in names:
                    row = table[n][pos]
                    row["decode_ratio"] = row["decode_tok_s"] / base["decode_tok_s"]
                    row["prefill_ratio"] = base["prefill_s"] / row["prefill_s"]
                    log(
                        f"{prec:5s} {n:20s} past {pos:4d}: decode {row['decode_tok_s']:7.1f} tok/s "
                        f"(x{row['decode_ratio']:.2f})"
                        f"  prefill {pos} tok {row['prefill_s'] * 1e3:7.1f} ms (x{row['prefill_ratio']:.2f})"
                    )
            results["results"][prec] = table
            del runners
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
