"""For GPU owners: load each CUDA variant of a package on CUDA, compare its greedy tokens with CPU fp32, print tok/s.

    pip install onnxruntime-gpu    # with a CUDA/cuDNN it supports
    python benchmarks/cuda_check.py PACKAGE [--new-tokens 64] [--prompt "..."] [--record]

A package serves CUDA when it was built with ``gpt2deploy build MODEL -o PACKAGE --target cpu,cuda`` (fp16) or
has a variant whose manifest ``providers`` include CUDAExecutionProvider. For each such variant: greedy tokens
on CUDA vs the fp32 variant on the CPU execution provider (the count of leading tokens that agree; fp16 may
part from fp32 after a near tie), and decode tok/s on both. Exit 1 when a CUDA variant fails to load or its
first greedy token differs from fp32's; exit 2 when CUDA is not available.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = (
    "The history of the printing press begins in",
    "def fibonacci(n):\n    ",
    "The weather in the mountains changes quickly, so hikers",
)


def _greedy(model, prompt: str, new: int) -> tuple[list[int], float]:
    result = model.generate_ids([model.encode(prompt)], max_new_tokens=new, do_sample=False, ignore_eos=True)
    tps = result.timings.get("decode_tokens_per_second")
    return list(result.tokens[0]), (tps if tps else float("nan"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", action="append", help="prompt(s) to decode (default: three built-in ones)")
    ap.add_argument("--record", action="store_true", help="write the table to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)

    import gpt2deploy
    from gpt2deploy.package import Package
    from gpt2deploy.runtime.providers import cuda_available

    if not cuda_available():
        print("error: onnxruntime has no CUDAExecutionProvider here; pip install onnxruntime-gpu on a CUDA machine")
        return 2
    pkg = Package.open(args.package)
    cuda_variants = [n for n, e in pkg.variants.items() if "CUDAExecutionProvider" in (e.get("providers") or [])]
    if not cuda_variants:
        print(f"error: {args.package} has no CUDA variant; rebuild it with --target cpu,cuda")
        return 2
    prompts = args.prompt or list(PROMPTS)
    ref = gpt2deploy.load(args.package, variant="fp32", device="cpu")
    reference = [_greedy(ref, p, args.new_tokens) for p in prompts]
    rows, failed = [], False
    for name in cuda_variants:
        try:
            model = gpt2deploy.load(args.package, variant=name, device="cuda")
        except Exception as e:  # report every variant, not only the first failure
            rows.append([name, "LOAD FAILED", str(e)[:100], "", ""])
            failed = True
            continue
        for prompt, (ref_tokens, ref_tps) in zip(prompts, reference, strict=True):
            tokens, tps = _greedy(model, prompt, args.new_tokens)
            agree = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=False)) if a != b), len(tokens))
            failed |= agree == 0
            rows.append([name, repr(prompt[:24]), f"{agree}/{len(tokens)}", f"{tps:.1f}", f"{ref_tps:.1f}"])
    header = ["variant (CUDA)", "prompt", "greedy tokens equal to CPU fp32", "CUDA tok/s", "CPU fp32 tok/s"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    if args.record:
        from benchmarks.results import md_table, record

        record("CUDA check", md_table(header, rows), "python benchmarks/cuda_check.py " + str(args.package))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
