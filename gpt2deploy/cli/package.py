"""`gpt2deploy verify / inspect / triton PACKAGE`: check, describe and serve a package."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .app import app, command, say


@app.command("verify")
@command
def verify_cmd(
    package: Path = typer.Argument(..., help="Package directory."),
    no_graphs: bool = typer.Option(False, "--no-graphs", help="Skip reading the graphs' I/O (hashes and layout only)."),
) -> None:
    """Check a package against its manifest (exit 0 valid, 1 with one line per problem).

    Checks the schema version, the sha256 and size of every listed file, that no ONNX file is unlisted and
    no symlink leaves the package, and each graph's inputs/outputs against the manifest's I/O contract.
    """
    from ..verify import verify_package

    report = verify_package(package, graphs=not no_graphs)
    if report.problems:
        for line in report.problems:
            typer.echo(f"FAIL {line}")
        n = len(report.problems)
        typer.echo(
            f"error: package {report.root} failed verification ({n} problem{'s' if n > 1 else ''}); rebuild it with "
            "'gpt2deploy build' or restore the files",
            err=True,
        )
        raise typer.Exit(1)
    graphs = f", {report.graphs_checked} graph I/O contracts ({report.graph_reader})" if report.graphs_checked else ""
    typer.echo(
        f"ok {report.root}: {report.files_checked} files match their sha256{graphs}; variants "
        f"{', '.join(report.variants)}"
    )


@app.command("inspect")
@command
def inspect_cmd(
    package: Path = typer.Argument(..., help="Package directory."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object instead of text."),
) -> None:
    """Describe a package: dims, variants, accuracy, library versions, defaults, automatic variant choice.

    Shows model dims; each variant's size, precision, providers and accuracy gate result (ppl delta,
    top-1 agreement); the library versions that built it; generation defaults; and which variant
    loading picks automatically on CPU and on CUDA.
    """
    from ..inspection import describe_package, format_description

    info = describe_package(package)
    typer.echo(json.dumps(info, indent=2) if as_json else format_description(info))


@app.command("triton")
@command
def triton_cmd(
    package: Path = typer.Argument(..., help="Package directory."),
    repo: Path = typer.Option(
        ..., "-o", "--out", help="Triton model repository directory (created if missing; other models are kept)."
    ),
    variant: str | None = typer.Option(
        None, "--variant", help="Variant to serve (default: the one picked automatically for --device)."
    ),
    name: str | None = typer.Option(None, "--name", help="Model name in the repository (default: <model>_<variant>)."),
    device: str = typer.Option("cpu", "--device", help="Instance kind: cpu or cuda."),
    instances: int = typer.Option(1, "--instances", help="Model instances Triton runs in parallel."),
    threads: int | None = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads per instance."),
    force: bool = typer.Option(False, "--force", help="Replace the model directory if it exists."),
) -> None:
    """Write a Triton Inference Server model (ONNX Runtime backend) for one variant of a package."""
    from ..triton import export_triton

    result = export_triton(
        package,
        repo,
        variant=variant,
        name=name,
        device=device,
        instances=instances,
        threads=threads,
        force=force,
        progress=lambda m: say(f"[triton] {m}"),
    )
    typer.echo(
        f"wrote {result.model_dir} (variant {result.variant}); serve with: tritonserver "
        f"--model-repository={result.model_dir.parent}"
    )
