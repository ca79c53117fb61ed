"""`gpt2deploy build MODEL -o OUT`: export, quantize, check and package in one command."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, command, say
from .progress import CommandProgress


@app.command("build")
@command
def build_cmd(
    model: str = typer.Argument(..., help="Local Hugging Face GPT-2 directory, or a hub id such as 'gpt2'."),
    out: Path = typer.Option(..., "-o", "--out", help="Package directory to write."),
    variants: str | None = typer.Option(
        None,
        "--variants",
        help=(
            "Comma-separated variants: fp32, int8, int4, fp16 (fp16 is for CUDA); default fp32,int8,int4. fp32 is "
            "always built as the reference; it is shipped only when listed."
        ),
    ),
    text: Path | None = typer.Option(
        None, "--text", help="UTF-8 text to measure accuracy on (default: the checker's built-in English text)."
    ),
    allow_regression: bool = typer.Option(
        False,
        "--allow-regression",
        help="Keep variants that fail their accuracy gate (recorded as failed; auto-selection skips them).",
    ),
    threshold: list[str] = typer.Option(
        [],
        "--threshold",
        help=(
            "Override an accuracy gate for every variant, NAME=VALUE (repeatable), e.g. top1=0.95; see 'gpt2deploy "
            "check --help'."
        ),
    ),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", help="Evaluation tokens for the accuracy check (default: the checker's)."
    ),
    target: str | None = typer.Option(
        None,
        "--target",
        help="Devices the package serves: cpu (default: fp32, int8, int4), cuda (adds fp16) or cpu,cuda. "
        "'gpt2deploy inspect' shows what each device loads.",
    ),
    opset: int | None = typer.Option(None, help="ONNX opset for the export (default 18)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists and is not empty."),
) -> None:
    """Build a package: export -> quantize each variant -> check each against fp32 -> write it in one rename.

    A variant that fails its accuracy gate is left out (exit code 1) unless --allow-regression.
    """
    from ..building import build_package, format_summary
    from ..inspection import fmt_size

    with CommandProgress() as p:
        result = build_package(
            model,
            out,
            variants=variants,
            thresholds=threshold or None,
            text=text,
            max_tokens=max_tokens,
            allow_regression=allow_regression,
            force=force,
            opset=opset,
            progress=p.message,
            target=target,
        )
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    say(f"[build] {timing}")
    typer.echo(format_summary(result.rows))
    total = sum(result.manifest["variants"][v]["size"] for v in result.variants)
    typer.echo(f"wrote {result.path} ({', '.join(result.variants)}; {fmt_size(total)} of graphs)")
    if result.rejected:
        why = "; ".join(f"{n}: {', '.join(map(str, r))}" for n, r in result.rejected.items())
        if allow_regression:
            say(f"warning: kept variants that failed their accuracy gate ({why}); auto-selection skips them")
        else:
            names = ", ".join(result.regressed)
            typer.echo(
                f"error: {names} failed the accuracy gate and {'was' if len(result.rejected) == 1 else 'were'} not "
                f"packaged ({why}); pass --allow-regression to keep {'it' if len(result.rejected) == 1 else 'them'}",
                err=True,
            )
            raise typer.Exit(1)
