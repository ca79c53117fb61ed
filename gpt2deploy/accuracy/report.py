"""Check reports: the JSON document (``--json``, ``--baseline``) and the human table."""

from __future__ import annotations

import math
from typing import Any

from .gates import GATES

REPORT_FORMAT = "gpt2deploy-check-report"
REPORT_VERSION = 1

#: Table rows: metric, label, how to print it.
ROWS = (
    ("ppl", "perplexity", "num"),
    ("ppl_delta", "ppl change", "pct"),
    ("top1", "top-1 agreement", "pct"),
    ("top5", "top-5 overlap", "pct"),
    ("kl_mean", "KL mean", "sci"),
    ("kl_p99", "KL p99", "sci"),
    ("logit_max", "|logit diff| max", "sci"),
    ("logit_p99", "|logit diff| p99", "sci"),
    ("greedy", "greedy match", "pct"),
    ("cache_diff", "cache vs recompute", "sci"),
    ("batch_diff", "batch vs single", "sci"),
    ("nonfinite", "NaN/Inf logits", "int"),
)


def sanitize(obj: Any) -> Any:
    """Replace NaN/Inf floats by None so the report is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    return obj


def _fmt(value, kind: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if kind == "pct":
        return f"{value * 100:.2f}%"
    if kind == "sci":
        return f"{value:.2e}"
    if kind == "int":
        return str(int(value))
    return f"{value:.3f}"


def _cell(metrics: dict, thresholds: dict, name: str, kind: str) -> str:
    value = metrics.get(name)
    if name == "ppl_delta" and value is not None and math.isfinite(value):
        text = f"{value * 100:+.2f}%"
    else:
        text = _fmt(value, kind)
    if name in thresholds:
        gate = GATES[name]
        ok = gate.passes(gate.value(metrics), thresholds[name])
        op = "<=" if gate.direction == "max" else ">="
        limit = _fmt(thresholds[name], kind)
        text = f"{text} ({op} {limit}) {'ok' if ok else 'FAIL'}"
    return text


def format_table(report: dict) -> str:
    """A metrics x variants table, then the failures, then one verdict line."""
    variants = report["variants"]
    names = list(variants)
    ref = report["reference"]
    ref_name = ref.get("variant") if ref.get("kind") == "variant" else ref.get("source")
    text = report["text"]
    lines = [
        f"reference: {ref.get('kind')} {ref_name}   text: {text['source']}, {text['tokens']} tokens "
        f"in windows of {report['window']} (sha256 {text['sha256'][:12]})"
    ]
    header = ["metric", *names]
    rows = [header]
    rows.append(["reference ppl", *[_fmt(variants[n]["metrics"].get("ppl_ref"), "num") for n in names]])
    for key, label, kind in ROWS:
        rows.append([label, *[_cell(variants[n]["metrics"], variants[n]["thresholds"], key, kind) for n in names]])
    rows.append(["result", *["PASS" if variants[n]["passed"] else "FAIL" for n in names]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())
    for n in names:
        for f in variants[n]["failures"]:
            lines.append(f"{n}: {f}")
        for note in variants[n].get("notes", []):
            lines.append(f"{n}: note: {note}")
    verdict = "PASS" if report["passed"] else "FAIL"
    failed = [n for n in names if not variants[n]["passed"]]
    lines.append(
        f"{verdict}: " + (f"{', '.join(failed)} regressed" if failed else f"{', '.join(names)} within the gates")
    )
    return "\n".join(lines)
