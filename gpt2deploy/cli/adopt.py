"""`gpt2deploy adopt DIR -o PKG`: take in a GPT-2 ONNX folder exported by Hugging Face Optimum."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, command, say


@app.command("adopt")
@command
def adopt_cmd(
    folder: Path = typer.Argument(
        ..., help="Folder written by 'optimum-cli export onnx --task text-generation-with-past'."
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Package directory to write."),
    reference: Path | None = typer.Option(
        None, "--reference", help="Local PyTorch GPT-2 checkpoint the export came from: prove parity with it."
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists and is not empty."),
) -> None:
    """Check an Optimum GPT-2 export (I/O contract, dims, tokenizer, external data), run it once and write it
    as a package with an fp32 variant; then 'quantize', 'check', 'run' work on it as on any package."""
    from ..adopting import adopt_folder

    manifest = adopt_folder(folder, out, reference=reference, force=force, progress=say)
    entry = manifest["variants"]["fp32"]
    parity = entry.get("parity")
    proof = f"; parity with {reference}: max abs diff {parity['max_abs_diff']:.2g}" if parity else ""
    typer.echo(f"wrote {out} (fp32 from {folder}, needs onnxruntime >= {entry['requires']['onnxruntime']}{proof})")
