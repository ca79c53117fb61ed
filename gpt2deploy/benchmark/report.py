"""Human-readable tables of a bench report (the JSON report is the dict itself)."""

from __future__ import annotations


def _spread(summary: dict | None, fmt: str = "{:.1f}") -> str:
    if not summary:
        return "n/a"
    return f"{fmt.format(summary['median'])} [{fmt.format(summary['min'])}-{fmt.format(summary['max'])}]"


def format_report(report: dict) -> str:
    """The summary table (median [min-max] over the runs) and, when measured, the long-context curve."""
    cfg = report["config"]
    threads = cfg["threads"] if cfg["threads"] else "default"
    lines = [
        f"package {report['package']}",
        f"workload: batch {cfg['batch']}, {cfg['prompt_tokens']}-token prompt + {cfg['new_tokens']} new tokens "
        "(greedy), "
        f"device {cfg['device']}, threads {threads}, {cfg['repeat']} runs after {cfg['warmup']} warm-up; median "
        "[min-max]",
        "",
    ]
    header = ["variant", "file MB", "load s", "TTFT ms", "decode tok/s", "end-to-end tok/s", "peak RSS MB"]
    rows = []
    gpu = False
    for name, v in report["variants"].items():
        mem = v["memory"]
        row = [
            name,
            f"{v['file_mb']:.1f}",
            f"{v['load_seconds']:.2f}" if v.get("load_seconds") is not None else "n/a",
            _spread(v["ttft_ms"]),
            _spread(v["decode_tok_s"]),
            _spread(v["e2e_tok_s"]),
            f"{mem['peak_rss_mb']:.0f}",
        ]
        g = mem.get("gpu")
        if g is not None:
            gpu = True
            row.append(f"{g['used_mb']:.0f}" if "used_mb" in g else f"n/a ({g.get('skipped', 'not reported')})")
        rows.append(row)
    if gpu:
        header.append("GPU MB")
    lines += _table(header, rows)
    for name, why in report.get("skipped", {}).items():
        lines.append(f"{name}: not measured ({why})")
    curves = {n: v["long_context"] for n, v in report["variants"].items() if v.get("long_context")}
    if curves:
        lines += [
            "",
            f"long context: decode tok/s after a prompt of N tokens ({cfg['curve_steps']} timed steps each)",
            "",
        ]
        positions = sorted({p["position"] for c in curves.values() for p in c})
        rows = []
        for pos in positions:
            row = [str(pos)]
            for curve in curves.values():
                point = next((p for p in curve if p["position"] == pos), None)
                row.append(f"{point['decode_tok_s']:.1f}" if point and point["decode_tok_s"] else "")
            rows.append(row)
        lines += _table(["position", *curves], rows)
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join(
            str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False))
        )

    return [fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]
