"""Summaries of the harness's measurements: medians, spread and ratios versus transformers, as markdown."""

from __future__ import annotations

import statistics

BASELINE = "transformers"


def summarize_peer(peer) -> dict:
    """Median/min/max of each metric over the peer's runs, plus its memory and load info."""
    out: dict = {"key": peer.key, "name": peer.name}
    if not peer.available:
        out["unavailable"] = peer.reason
        if peer.runs:
            out["partial_runs"] = peer.runs
        return out
    for metric in ("ttft_ms", "decode_tok_s", "e2e_tok_s"):
        values = [r[metric] for r in peer.runs if r.get(metric) is not None]
        if values:
            out[metric] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "n": len(values),
            }
    out["memory"] = peer.memory
    out["load_s"] = peer.info.get("load_s")
    out["model_mb"] = peer.info.get("model_mb")
    out["runs"] = peer.runs
    if peer.curve is not None:
        out["long_context"] = peer.curve
    if "curve_error" in peer.info:
        out["long_context_error"] = peer.info["curve_error"]
    return out


def add_ratios(rows: list[dict]) -> None:
    """Ratios vs transformers: speed (higher is faster) for decode, end-to-end and TTFT; peak RSS.

    Speed ratios are paired: in each round every engine ran back to back, so the ratio of an engine's run to
    transformers' run of the same round shares the machine's load at that moment; the median over rounds is
    reported (``vs_transformers``). Ratios of the overall medians are kept too (``vs_transformers_of_medians``).
    """
    base = next((r for r in rows if r["key"] == BASELINE and "unavailable" not in r), None)
    if base is None:
        return
    base_runs = {run["round"]: run for run in base.get("runs", [])}
    for r in rows:
        if "unavailable" in r:
            continue
        paired: dict[str, list[float]] = {"decode": [], "e2e": [], "ttft_speedup": []}
        for run in r.get("runs", []):
            b = base_runs.get(run["round"])
            if b is None:
                continue
            if run.get("decode_tok_s") and b.get("decode_tok_s"):
                paired["decode"].append(run["decode_tok_s"] / b["decode_tok_s"])
            paired["e2e"].append(run["e2e_tok_s"] / b["e2e_tok_s"])
            paired["ttft_speedup"].append(b["ttft_ms"] / run["ttft_ms"])
        ratios = {k: statistics.median(v) for k, v in paired.items() if v}
        of_medians = {}
        if "decode_tok_s" in r and "decode_tok_s" in base:
            of_medians["decode"] = r["decode_tok_s"]["median"] / base["decode_tok_s"]["median"]
        if "e2e_tok_s" in r and "e2e_tok_s" in base:
            of_medians["e2e"] = r["e2e_tok_s"]["median"] / base["e2e_tok_s"]["median"]
        if "ttft_ms" in r and "ttft_ms" in base:
            of_medians["ttft_speedup"] = base["ttft_ms"]["median"] / r["ttft_ms"]["median"]
        if r.get("memory", {}).get("peak_rss_mb") and base.get("memory", {}).get("peak_rss_mb"):
            ratios["peak_rss"] = of_medians["peak_rss"] = r["memory"]["peak_rss_mb"] / base["memory"]["peak_rss_mb"]
        r["vs_transformers"] = ratios
        r["vs_transformers_of_medians"] = of_medians


def _m(summary: dict | None, digits: int = 1) -> str:
    if not summary:
        return "n/a"
    return f"{summary['median']:.{digits}f} ({summary['min']:.{digits}f}-{summary['max']:.{digits}f})"


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def _load_note(result: dict) -> str:
    loads = [run["load1"] for r in result["engines"] for run in r.get("runs", []) if run.get("load1") is not None]
    cpus = result.get("machine", {}).get("cpus")
    if not loads or not cpus:
        return ""
    return (
        f" Machine load (1-min average) during the timed runs: median {statistics.median(loads):.1f}, "
        f"max {max(loads):.1f} on {cpus} CPUs (the benchmark itself adds up to its thread count)."
    )


def markdown(result: dict) -> str:
    w = result["workload"]
    lines = [
        f"Workload: {w['shape']}, batch 1, {w['prompt_tokens']}-token prompt + {w['new_tokens']} greedy new tokens, "
        f"{w['threads']} threads, CPU; {w['repeat']} runs per engine in alternating order after 1 warm-up; "
        "median (min-max). Ratios are versus transformers `generate()` fp32 in the same run: speed ratios are the "
        "median over rounds of the ratio to transformers' run of the same round (higher is faster); RSS: lower is "
        "smaller. Peak RSS is the engine process's peak (load included) over the timed workload, before the "
        "long-context curve." + _load_note(result),
        "",
        "| engine | model MB | TTFT ms | decode tok/s | end-to-end tok/s | peak RSS MB | decode vs HF | e2e vs HF | "
        "TTFT speedup vs HF | RSS vs HF |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["engines"]:
        if "unavailable" in r:
            lines.append(
                f"| {r['name']} | not available: {r['unavailable'].removeprefix('not available: ')} | | | | | | | | |"
            )
            continue
        ratio = r.get("vs_transformers", {})
        rss = r.get("memory", {}).get("peak_rss_mb")
        size = f"{r['model_mb']:.0f}" if r.get("model_mb") else "n/a"
        lines.append(
            f"| {r['name']} | {size} | {_m(r.get('ttft_ms'))} | {_m(r.get('decode_tok_s'))} | "
            f"{_m(r.get('e2e_tok_s'))} | "
            f"{f'{rss:.0f}' if rss else 'n/a'} | {_x(ratio.get('decode'))} | {_x(ratio.get('e2e'))} | "
            f"{_x(ratio.get('ttft_speedup'))} | {_x(ratio.get('peak_rss'))} |"
        )
    curves = [(r["name"], r["long_context"]) for r in result["engines"] if r.get("long_context")]
    if curves:
        steps = result["workload"]["curve_steps"]
        reps = result["workload"].get("curve_repeat", 1)
        lines += [
            "",
            f"Long context: decode tok/s after a prompt of N tokens ({steps} timed decode steps; median of {reps} "
            "runs).",
            "",
        ]
        lines.append("| position | " + " | ".join(name for name, _ in curves) + " |")
        lines.append("|---:|" + "---:|" * len(curves))
        positions = sorted({p["position"] for _, c in curves for p in c})
        for pos in positions:
            cells = []
            for _, c in curves:
                point = next((p for p in c if p["position"] == pos), None)
                cells.append(f"{point['decode_tok_s']:.1f}" if point and point.get("decode_tok_s") else "")
            lines.append(f"| {pos} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(
            "| engine | decode tok/s at the last position / at the first | peak RSS MB with the long prompts |"
        )
        lines.append("|---|---:|---:|")
        for r in result["engines"]:
            pts = [p for p in r.get("long_context") or [] if p.get("decode_tok_s")]
            if len(pts) >= 2:
                peak = r.get("memory", {}).get("with_long_context", {}).get("peak_rss_mb")
                lines.append(
                    f"| {r['name']} | {pts[-1]['decode_tok_s'] / pts[0]['decode_tok_s']:.2f} | "
                    f"{f'{peak:.0f}' if peak else 'n/a'} |"
                )
    return "\n".join(lines) + "\n"
