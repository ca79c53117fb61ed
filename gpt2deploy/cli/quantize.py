"""`gpt2deploy quantize PACKAGE --mode int8|int4|fp16`."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, command, say
from .progress import CommandProgress


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@app.command("quantize")
@command
def quantize_cmd(
    package: Path = typer.Argument(..., help="Package directory (written by 'gpt2deploy export' or 'build')."),
    mode: str = typer.Option(..., "--mode", "-m", help="int8 (CPU), int4 (CPU and CUDA, MatMulNBits) or fp16 (CUDA)."),
    per_channel: bool = typer.Option(
        False, "--per-channel", help="int8: one scale per output column instead of per matrix."
    ),
    granularity: str | None = typer.Option(
        None,
        "--granularity",
        help=(
            "int8 weight scales: tensor (default), channel (= --per-channel) or block (8-bit MatMulNBits blocks: "
            "more accurate, a little larger)."
        ),
    ),
    block_size: int | None = typer.Option(
        None,
        "--block-size",
        help=(
            "Weights per quantization block (power of two >= 16): int4 (default 32), int8 --granularity block "
            "(default 128)."
        ),
    ),
    exclude: str = typer.Option(
        "",
        "--exclude",
        help="Comma list of MatMuls to keep in float: node or weight names, a weight prefix ending in '.', or lm_head.",
    ),
    head_bits: int | None = typer.Option(
        None,
        "--head-bits",
        help=(
            "int4: bits of the lm_head and tied embedding table (default 4; 8 is more accurate, larger and "
            "slower: see benchmarks/RESULTS.md)."
        ),
    ),
    untie_lm_head: bool = typer.Option(
        False,
        "--untie-lm-head",
        help=(
            "int8: give the lm_head its own int8 weight (DynamicQuantizeMatMul) and the embedding its own int8 "
            "rows instead of one shared table: faster, most at batch sizes above 1 (servers), but a larger file "
            "and slightly less accurate logits (see benchmarks/RESULTS.md)."
        ),
    ),
    attention: str | None = typer.Option(
        None,
        "--attention",
        help=(
            "Fused attention: gqa (CPU, in-place KV cache, fastest; default for int8/int4) or mha (CPU and CUDA; "
            "default for fp16)."
        ),
    ),
    force: bool = typer.Option(False, "--force", help="Replace the variant if the package already has it."),
) -> None:
    """Add a quantized variant (model_int8 / model_q4 / model_fp16) built from the package's fp32 graph."""
    from ..quantizing import quantize_package

    with CommandProgress(f"[quantize {mode}]") as p:
        result = quantize_package(
            package,
            mode,
            per_channel=per_channel,
            block_size=block_size,
            exclude=[e for e in exclude.split(",") if e.strip()],
            force=force,
            **({"head_bits": head_bits} if head_bits is not None else {}),
            **({"attention": attention} if attention is not None else {}),
            **({"granularity": granularity} if granularity is not None else {}),
            **({"share_embedding": False} if untie_lm_head else {}),
            progress=p.message,
        )
    s = result["summary"]
    check = s["sample_check"]
    fused = ", ".join(f"{k} x{v}" for k, v in s["fused"].items()) or "none"
    say(f"[quantize {mode}] summary")
    say(f"  size         {_mb(s['size_before'])} (fp32) -> {_mb(s['size_after'])} ({s['size_ratio']:.2f}x)")
    say(f"  fused ops    {fused}")
    say(
        "  kv cache     "
        + (
            "one in-place buffer per tensor (past = present)"
            if s["kv_cache"] == "shared"
            else "past and present as separate tensors"
        )
    )
    if mode == "fp16":
        say(f"  matmuls      all weight MatMuls in float16; excluded {len(s['excluded'])}")
    else:
        say(
            f"  matmuls      {s['quantized_matmuls']} quantized, {s['skipped_matmuls']} left float"
            + (f" (excluded: {', '.join(s['excluded'])})" if s["excluded"] else "")
        )
    if s.get("lm_head"):
        say(f"  lm_head      {s['lm_head']}")
    frac = s["float_weight_fraction"]
    if frac is not None:
        say(
            f"  float bytes  {frac * 100:.1f}% of weight bytes"
            + (" (float16 + float32)" if mode == "fp16" else " left in float")
        )
    say(
        f"  sample text  {check['tokens']} tokens: logits finite, top-1 agreement with fp32 "
        f"{check['top1_agreement'] * 100:.1f}%, max |dlogit| {check['max_abs_logit_diff']:.3g}"
    )
    say(f"  providers    {', '.join(s['providers'])}")
    say(f"  note         {s['note']}")
    if s.get("isa_note"):
        say(f"  isa          {s['isa_note']}")
    say("  time         " + ", ".join(f"{k} {v:.1f}s" for k, v in s["seconds"].items()))
    typer.echo(f"wrote {Path(package) / s['file']} ({_mb(s['size_after'])}, variant {result['variant']})")
