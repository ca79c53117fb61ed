"""PNG of the long-context curve: decode tok/s versus position, one line per variant (matplotlib, imported lazily)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError
from ..fsutil import staged_file


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib; install it with: pip install 'gpt2deploy[bench]'") from None


def plot_curves(report: dict, out: str | os.PathLike) -> Path:
    """Write the curve of every variant in ``report`` to ``out`` (PNG), atomically."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = Path(out)
    curves = {n: v["long_context"] for n, v in report["variants"].items() if v.get("long_context")}
    if not curves:
        raise UsageError("the report has no long-context curve to plot; run without --no-long-context")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        for name, curve in curves.items():
            xs = [p["position"] for p in curve if p["decode_tok_s"]]
            ys = [p["decode_tok_s"] for p in curve if p["decode_tok_s"]]
            ax.plot(xs, ys, marker="o", label=name)
        cfg = report["config"]
        ax.set_xlabel("position (tokens already in the KV cache)")
        ax.set_ylabel("decode tokens/s")
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0, right=report["model"]["n_positions"])
        ax.set_title(
            f"Decode speed vs position (batch {cfg['batch']}, {cfg['device']}, threads {cfg['threads'] or 'default'})"
        )
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with staged_file(out) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out
