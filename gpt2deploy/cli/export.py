"""`gpt2deploy export MODEL -o OUT`."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, command, say
from .progress import CommandProgress


@app.command("export")
@command
def export_cmd(
    model: str = typer.Argument(..., help="Local Hugging Face GPT-2 directory, or a hub id such as 'gpt2'."),
    out: Path = typer.Option(..., "-o", "--out", help="Package directory to write."),
    opset: int | None = typer.Option(None, help="ONNX opset (18 to 23; default 18)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists and is not empty."),
    atol: float | None = typer.Option(None, help="Parity tolerance on logits (default 1e-4)."),
    portable: bool = typer.Option(
        False,
        "--portable",
        help=(
            "Keep the fp32 graph in plain ONNX ops (other runtimes, CUDA) instead of the CPU-optimized graph with "
            "fused attention and an in-place KV cache."
        ),
    ),
) -> None:
    """Export a GPT-2 checkpoint to an ONNX package with a KV-cache graph, validated against PyTorch."""
    from ..exporting import export_package

    with CommandProgress("[export]") as p:
        result = export_package(
            model, out, opset=opset, force=force, atol=atol, progress=p.message, optimize=not portable
        )
    fp32 = result.manifest["variants"]["fp32"]
    parity = fp32["parity"]
    say(
        f"[export] parity: max abs logit diff {parity['max_abs_diff']:.2e} (tolerance {parity['atol']:g}), "
        f"greedy tokens identical over {parity['decode_steps']} decode steps, left-padded batch ok"
    )
    say(f"[export] export {result.export_seconds:.1f}s, parity {result.parity_seconds:.1f}s")
    typer.echo(f"wrote {result.path} (fp32 {fp32['size'] / 1e6:.1f} MB)")
