"""The llama.cpp comparison: paired decode ratios and each engine's fraction of the measured read bandwidth.

Ratios are per round (both engines ran back to back in that round), median over rounds. The bandwidth
fraction is weight bytes per token (the model file: every weight is read once per decode step at batch 1)
x median decode tok/s / the read bandwidth probed in the same run (``bandwidth.py``).
"""

from __future__ import annotations

import statistics

from results import md_table

#: (numerator, denominator) engine keys of the decode ratios the comparison reports.
PAIRS = [
    ("gpt2deploy-int8", "llamacpp-q8_0"),
    ("gpt2deploy-int4", "llamacpp-q4_0"),
    ("gpt2deploy-fp32", "llamacpp-f32"),
    ("gpt2deploy-int4", "gpt2deploy-int8"),
    ("llamacpp-q4_0", "llamacpp-q8_0"),
]


def paired_ratio(a: dict, b: dict) -> float | None:
    runs_b = {r["round"]: r for r in b.get("runs", [])}
    ratios = [
        r["decode_tok_s"] / runs_b[r["round"]]["decode_tok_s"]
        for r in a.get("runs", [])
        if r.get("decode_tok_s") and runs_b.get(r["round"], {}).get("decode_tok_s")
    ]
    return statistics.median(ratios) if ratios else None


def section(result: dict) -> str | None:
    """Markdown for RESULTS.md, or None when no llama.cpp engine ran."""
    rows = {r["key"]: r for r in result["engines"] if "unavailable" not in r}
    missing = [r for r in result["engines"] if "unavailable" in r and r["key"].startswith("llamacpp-")]
    if not any(k.startswith("llamacpp-") for k in rows) and not missing:
        return None
    bw = result.get("bandwidth", {})
    one, many = bw.get("1"), bw.get(str(result["workload"]["threads"]))
    w = result["workload"]
    table = []
    for key, r in rows.items():
        if not (key.startswith("gpt2deploy-") or key.startswith("llamacpp-")) or "decode_tok_s" not in r:
            continue
        tok_s = r["decode_tok_s"]["median"]
        used = (r.get("model_mb") or 0) * 2**20 * tok_s / 1e9
        table.append(
            [
                r["name"],
                f"{r.get('model_mb') or 0:.0f}",
                f"{tok_s:.1f} ({r['decode_tok_s']['min']:.1f}-{r['decode_tok_s']['max']:.1f})",
                f"{used:.2f}",
                f"{used / one:.2f}" if one else "n/a",
                f"{used / many:.2f}" if many else "n/a",
            ]
        )
    for r in missing:
        table.append([f"{r['key']}: {r['unavailable']}", "", "", "", "", ""])
    ratios = []
    for a, b in PAIRS:
        if a in rows and b in rows:
            value = paired_ratio(rows[a], rows[b])
            if value is not None:
                ratios.append([f"{a} / {b}", f"{value:.2f}x"])
    bw_line = (
        f"Read bandwidth probed in the same run (numpy sum over 256 MiB, best of 3 passes, median over rounds): "
        f"{one:.1f} GB/s on 1 thread, {many:.1f} GB/s on {w['threads']} threads."
        if one and many
        else "Read bandwidth: not measured."
    )
    return "\n\n".join(
        [
            f"Workload: {w['shape']}, batch 1, {w['prompt_tokens']}-token prompt + {w['new_tokens']} greedy new "
            f"tokens, {w['threads']} threads; llama.cpp timed by `llama-bench` (decode: tg{w['new_tokens']} at depth "
            f"{w['prompt_tokens']}); {w['repeat']} alternating rounds, median (min-max). " + bw_line,
            md_table(
                ["engine", "weights MB", "decode tok/s", "weight GB/s read", "of 1-thread bw", "of all-thread bw"],
                table,
            ),
            "Decode ratios (paired per round, median):",
            md_table(["ratio", "decode"], ratios),
        ]
    )
