"""PNG of the harness's long-context curves: decode tok/s versus position, one line per engine."""

from __future__ import annotations

from pathlib import Path


def plot_curves(result: dict, out: Path) -> Path | None:
    """Write the curves to ``out``; None when matplotlib is missing or no engine measured a curve."""
    curves = [(r["name"], r["long_context"]) for r in result["engines"] if r.get("long_context")]
    if not curves:
        return None
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=110)
    try:
        for name, curve in curves:
            pts = [p for p in curve if p.get("decode_tok_s")]
            ax.plot([p["position"] for p in pts], [p["decode_tok_s"] for p in pts], marker="o", label=name)
        w = result["workload"]
        ax.set_xlabel("position (tokens already in the KV cache)")
        ax.set_ylabel("decode tokens/s")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_title(
            f"Decode speed vs position ({w['shape'].split(',')[0]}, batch 1, {w['threads']} threads)", fontsize=10
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out
