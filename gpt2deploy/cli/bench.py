"""`gpt2deploy bench PACKAGE`: TTFT, decode and end-to-end tok/s, peak memory and the long-context curve."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .app import app, command, output_file, say
from .progress import CommandProgress


@app.command("bench")
@command
def bench_cmd(
    package: Path = typer.Argument(..., help="Package directory."),
    variant: list[str] | None = typer.Option(
        None, "--variant", "-v", help="Variant to measure (repeatable). Default: the one 'run' would pick."
    ),
    all_variants: bool = typer.Option(False, "--all", help="Measure every variant in the package."),
    prompt_tokens: int = typer.Option(32, help="Prompt length in tokens (synthetic, deterministic ids)."),
    new_tokens: int = typer.Option(128, help="Tokens generated per run (EOS ignored, always exactly this many)."),
    batch: int = typer.Option(1, help="Prompts per call."),
    threads: int | None = typer.Option(None, help="ONNX Runtime intra-op threads (default: ONNX Runtime's choice)."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    repeat: int = typer.Option(5, help="Timed runs per variant (after the warm-up); median and spread are reported."),
    warmup: int = typer.Option(1, help="Untimed warm-up runs per variant."),
    json_out: Path | None = typer.Option(
        None, "--json", help="Write the full report as JSON to this file ('-' for stdout)."
    ),
    plot: Path | None = typer.Option(
        None, "--plot", help="Write the long-context curve (decode tok/s vs position) as a PNG."
    ),
    long_context: bool = typer.Option(
        True, "--long-context/--no-long-context", help="Measure decode tok/s at positions up to the context length."
    ),
    curve_points: int = typer.Option(8, help="Positions sampled on the long-context curve."),
    curve_steps: int = typer.Option(16, help="Decode steps timed at each position of the curve."),
    curve_repeat: int = typer.Option(1, help="Runs per curve position (the median is kept)."),
    seed: int = typer.Option(0, help="Seed of the synthetic prompt ids."),
    no_verify: bool = typer.Option(
        False, "--no-verify", help="Skip the sha256 check of the package files when loading."
    ),
) -> None:
    """Benchmark a package's variants with the runtime's own generation loop."""
    from ..benchmark import BenchConfig, bench_package
    from ..benchmark.plot import plot_curves, require_matplotlib
    from ..benchmark.report import format_report
    from ..errors import UsageError
    from ..fsutil import write_json_atomic

    if variant and all_variants:
        raise UsageError("pass either --variant or --all, not both")
    config = BenchConfig(
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        batch=batch,
        repeat=repeat,
        warmup=warmup,
        threads=threads,
        device=device,
        long_context=long_context,
        curve_points=curve_points,
        curve_steps=curve_steps,
        curve_repeat=curve_repeat,
        seed=seed,
        verify=not no_verify,
        variants=tuple(variant or ()),
    )
    config.validate()
    if json_out is not None:
        json_out = output_file(json_out, "--json", allow_stdout=True)
    if plot is not None:
        if not long_context:
            raise UsageError("--plot draws the long-context curve; drop --no-long-context")
        plot = output_file(plot, "--plot", ".png")
        require_matplotlib()

    with CommandProgress() as p:
        report = bench_package(package, config, all_variants=all_variants, progress=p.message)
    if plot is not None:
        plot_curves(report, plot)
        say(f"[bench] wrote {plot}")
    if json_out is not None and str(json_out) == "-":
        typer.echo(json.dumps(report, indent=2))
        return
    if json_out is not None:
        write_json_atomic(json_out, report)
        say(f"[bench] wrote {json_out}")
    typer.echo(format_report(report))
