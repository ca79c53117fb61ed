"""`gpt2deploy check PACKAGE`: accuracy gates of package variants against a reference, on real text."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, command, output_file, say
from .progress import CommandProgress


@app.command("check")
@command
def check_cmd(
    package: Path = typer.Argument(..., help="Package directory."),
    variant: list[str] | None = typer.Option(
        None,
        "--variant",
        "-v",
        help=(
            "Variant to check (repeatable, or a comma list). Default: every variant except the reference (fp32 alone "
            "is checked against itself)."
        ),
    ),
    all_variants: bool = typer.Option(False, "--all", help="Check every variant, the reference's included."),
    reference: str = typer.Option(
        "fp32",
        "--reference",
        help=(
            "'fp32' (or another variant name), a package directory, or the Hugging Face checkpoint directory the "
            "package came from (runs PyTorch; needs the export extra)."
        ),
    ),
    text: Path | None = typer.Option(
        None, "--text", help="UTF-8 evaluation text. Default: Python's pydoc_data topics prose (no download)."
    ),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", help="Tokens to evaluate, in windows of 128 (default 4096)."
    ),
    baseline: Path | None = typer.Option(
        None,
        "--baseline",
        help="A previous --json report: also fail when a metric got worse than it by more than its tolerance.",
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write the full report as JSON to this file."),
    threshold: list[str] | None = typer.Option(
        None,
        "--threshold",
        "-t",
        help="Override a gate, NAME=VALUE (e.g. kl_mean=0.01); NAME.tol=VALUE sets a baseline tolerance. Repeatable.",
    ),
    record: bool = typer.Option(
        True, "--record/--no-record", help="Store the result per variant in the package manifest."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
    threads: int | None = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads (default: all cores)."),
) -> None:
    """Measure variants against a reference on real text and fail (exit 1) when an accuracy gate is crossed."""
    from ..accuracy.report import format_table
    from ..checking import check_package, write_report
    from ..errors import RegressionError, UsageError

    if variant and all_variants:
        raise UsageError("pass either --variant or --all, not both")
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max-tokens must be a positive integer (got {max_tokens})")
    out = output_file(json_out, "--json") if json_out is not None else None
    variants = [n.strip() for v in variant or () for n in v.split(",") if n.strip()] or None
    if all_variants:
        from ..package import Package

        variants = list(Package.open(package).variants)
    with CommandProgress("[check]") as p:
        report = check_package(
            package,
            variants=variants,
            reference=reference,
            text=text,
            max_tokens=max_tokens,
            baseline=baseline,
            thresholds=threshold or None,
            progress=p.message,
            record=record,
            device=device,
            threads=threads,
            on_step=p.step,
        )
    typer.echo(format_table(report))
    if out is not None:
        write_report(report, out)
        say(f"[check] wrote {out}")
    if not report["passed"]:
        failed = {n: v for n, v in report["variants"].items() if not v["passed"]}
        first = "; ".join(
            f"{n}: {v['failures'][0]}" + (f" (+{len(v['failures']) - 1} more)" if len(v["failures"]) > 1 else "")
            for n, v in failed.items()
        )
        raise RegressionError(
            f"accuracy regression in {', '.join(failed)} ({first}); fix the variant, or loosen a gate with "
            "--threshold NAME=VALUE if the change is intended"
        )
