"""What `gpt2deploy quantize` tells the user: the variant's note (recorded in the manifest) and the summary."""

from __future__ import annotations

NOTES = {
    "int8": "CPU variant: int8 weights, uint8 activations quantized per call (DynamicQuantizeMatMul)",
    "int4": (
        "CPU and CUDA variant: 4-bit block weights (MatMulNBits, lm_head/embedding table in recipe.head_bits), float "
        "activations"
    ),
    "fp16": (
        "CUDA variant: on the CPU execution provider float16 is slower than fp32; 'run'/'auto' pick it only on CUDA"
    ),
}
INT8_BLOCKS_NOTE = (
    "CPU variant: int8 weights in symmetric blocks (MatMulNBits), activations quantized to int8 per block at run time"
)


def note_for(name: str, default_providers: list[str], providers: list[str], granularity: str | None = None) -> str:
    """The manifest note of variant ``name`` that runs on ``providers`` (its mode's default: ``default_providers``)."""
    if name == "int8" and granularity == "block":
        return INT8_BLOCKS_NOTE
    if "CUDAExecutionProvider" in default_providers and "CUDAExecutionProvider" not in providers:
        return NOTES[name].replace(
            "CPU and CUDA variant", "CPU variant (in-place KV cache; quantize with --attention mha for CUDA)"
        )
    return NOTES[name]


def head_note(name: str, result) -> str | None:
    """How the lm_head was stored, from a pass's ``PassResult``."""
    head = result.head
    if head is None:
        return None
    if name == "int8":
        if head.shared_with_embedding:
            return f"int8 blocks of {head.block_size} (MatMulNBits), shared with the embedding lookup"
        return "int8, untied from the embedding"
    if name == "int4":
        kind = "symmetric " if head.symmetric else ""
        shared = ", shared with the embedding lookup" if head.shared_with_embedding else ""
        return f"{head.bits}-bit {kind}blocks of {head.block_size}{shared}"
    return None


def isa_note(name: str, result) -> str | None:
    if name != "int8" or result.cpu_vnni is not False or result.reduce_range:
        return None
    return (
        "this CPU has no VNNI: u8 x s8 int8 products use saturating 16-bit pairs; if accuracy drops, "
        "quantize with reduce_range=True (7-bit weights); VNNI CPUs and ARM need no change"
    )


def summary(pkg, name: str, entry: dict, opt_report, result, check: dict, timings: dict) -> dict:
    """The plain summary ``quantize_package`` returns (and the CLI prints)."""
    fp32_size = pkg.variant("fp32")["size"]
    return {
        "variant": name,
        "file": entry["file"],
        "size_before": fp32_size,
        "size_after": entry["size"],
        "size_ratio": round(entry["size"] / fp32_size, 4) if fp32_size else None,
        "fused": opt_report.fused,
        "kv_cache": opt_report.kv_cache,
        "quantized_matmuls": result.quantized_matmuls,
        "skipped_matmuls": result.skipped_matmuls,
        "excluded": result.excluded,
        "float_weight_fraction": result.float_weight_fraction,
        "sample_check": check,
        "providers": entry["providers"],
        "note": entry["note"],
        "isa_note": isa_note(name, result),
        "lm_head": head_note(name, result),
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }
