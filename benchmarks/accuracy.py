"""Accuracy of the default variants on the trained reference model, written to the results file.

    python benchmarks/accuracy.py [--model ../shared/models/gpt2-ref] [--variants fp32,fp16,int8,int4]

Builds the model's package once per version of the graph-writing code (``gpt2deploy build``, cached in
``benchmarks/.work/accuracy-pkg-<code key>``; ``--rebuild`` makes it again), runs ``check_package`` for every
variant against fp32 on the default text, and records the metrics table as the ``Accuracy`` section of
``benchmarks/RESULTS.md``, with a row for int8 quantized with ``--untie-lm-head``. The default gates in
``gpt2deploy/accuracy/gates.py`` were chosen with headroom above these figures.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import prepare  # noqa: E402
import results  # noqa: E402

from gpt2deploy.building import build_package  # noqa: E402
from gpt2deploy.checking import check_package  # noqa: E402

COLUMNS = [
    ("ppl_delta", "ppl Δ", lambda v: f"{v * 100:+.2f}%"),
    ("top1", "top-1", lambda v: f"{v * 100:.2f}%"),
    ("top5", "top-5", lambda v: f"{v * 100:.2f}%"),
    ("kl_mean", "KL mean", lambda v: f"{v:.2g}"),
    ("kl_p99", "KL p99", lambda v: f"{v:.2g}"),
    ("logit_max", "logit max", lambda v: f"{v:.3g}"),
    ("logit_p99", "logit p99", lambda v: f"{v:.3g}"),
    ("greedy", "greedy", lambda v: f"{v * 100:.0f}%"),
    ("cache_diff", "cache", lambda v: f"{v:.2g}"),
    ("batch_diff", "batch", lambda v: f"{v:.2g}"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT.parent / "shared" / "models" / "gpt2-ref")
    ap.add_argument("--variants", default="fp32,fp16,int8,int4")
    ap.add_argument("--work", type=Path, default=HERE / ".work" / f"accuracy-pkg-{prepare.graph_code_key()}")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--no-record", action="store_true", help="print the table only")
    a = ap.parse_args(argv)
    if a.rebuild or not (a.work / "manifest.json").is_file():
        shutil.rmtree(a.work, ignore_errors=True)
        a.work.parent.mkdir(parents=True, exist_ok=True)
        build_package(str(a.model), a.work, variants=a.variants, allow_regression=True, progress=print)
    names = [v for v in a.variants.split(",") if v != "fp32"]
    report = check_package(a.work, variants=names, record=False)
    rows = []
    for name in names:
        m = report["variants"][name]["metrics"]
        status = "pass" if report["variants"][name]["passed"] else "FAIL"
        rows.append([name, *(fmt(m[k]) for k, _, fmt in COLUMNS), status])
    if "int8" in names:  # the server-oriented int8 option, on the same text
        from decode_profile import recipe_copy

        copy = recipe_copy(a.work, "int8untied", print, mode="int8", share_embedding=False)
        if copy is not None:
            v = check_package(copy, variants=["int8"], record=False)["variants"]["int8"]
            rows.append(
                [
                    "int8 --untie-lm-head",
                    *(fmt(v["metrics"][k]) for k, _, fmt in COLUMNS),
                    "pass" if v["passed"] else "FAIL",
                ]
            )
    text = report.get("text", {})
    body = (
        f"Model `{a.model.name}`, every variant against the package's fp32 on {text.get('tokens', '?')} tokens of "
        f"`{text.get('source', '?')}`; reference perplexity "
        f"{report['variants'][names[0]]['metrics'].get('ppl_ref', float('nan')):.1f}.\n\n"
        + results.md_table(["variant", *(h for _, h, _ in COLUMNS), "gates"], rows)
    )
    print(body)
    if not a.no_record:
        print(f"wrote {results.record('Accuracy', body)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
