"""INT4 (CPU and CUDA): weight-only block quantization with ``MatMulNBits``, the lm_head included.

Each weight MatMul becomes ``MatMulNBits`` (4-bit weights in blocks of ``block_size`` along K, one
scale and zero point per block); activations stay float. The tied token embedding (a lookup, not a
MatMul) by default reads the lm_head's own quantized blocks (``embedding="tied"``, see ``tied_nbits``):
the largest matrix is stored once. Alternatives: ``"int8"`` a separate int8 table with one scale per
row, ``"int4"`` a separate ``GatherBlockQuantized`` table, ``"fp32"`` the float table. Gemms are rewritten to MatMul + Add by
``optimize`` first, because MatMulNBits only replaces MatMul.

The lm_head is quantized with ``head_bits`` (default 8: logits are the most sensitive output, and the
tied embedding shares its table); ``head_bits=4`` makes everything 4-bit (smallest, fastest).

``accuracy_level`` picks the CPU compute type: 0/1 unpack to fp32 (exact, slower), 4 quantizes the
activations to int8 per block and uses integer dot products (fastest on x86 with VNNI and on ARM).
"""
from __future__ import annotations

from .errors import QuantError
from .exclude import lm_head_nodes, resolve_exclude
from .int8 import quiet_ort_logging
from .lm_head import untie_lm_head
from .report import describe
from .tied_int8 import int8_embedding
from .tied_nbits import share_tied_nbits

DEFAULT_BLOCK_SIZE = 32
DEFAULT_ACCURACY_LEVEL = 4
#: The lm_head (and with it the tied embedding) in 8-bit blocks: +3 to +5 points of top-1 agreement and a
#: third of the perplexity change for ~15% of decode speed; still faster than INT8 (see README).
DEFAULT_HEAD_BITS = 8
EMBEDDINGS = ("tied", "int8", "int4", "fp32")


def check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise QuantError(f"block size {block_size} is not a power of two >= 16; pass --block-size 16, 32, 64, 128 or 256")


def quantize_int4(
    model,
    block_size: int = DEFAULT_BLOCK_SIZE,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    bits: int = 4,
    symmetric: bool = False,
    exclude=(),
    embedding: str = "tied",
    head_bits: int | None = None,
):
    """Return ``(model, info)``; ``model`` is an optimized fp32 decoder graph (see ``optimize``)."""
    check_block_size(block_size)
    head_bits = (DEFAULT_HEAD_BITS if bits == 4 else bits) if head_bits is None else head_bits
    if bits not in (4, 8) or head_bits not in (4, 8):
        raise QuantError(f"MatMulNBits supports 4 or 8 bits, not {bits if bits not in (4, 8) else head_bits}; pass 4 or 8")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise QuantError(f"accuracy_level {accuracy_level} is not one of 0-4; pass 0 (fp32 compute) or 4 (int8 compute)")
    if embedding not in EMBEDDINGS:
        raise QuantError(f"embedding '{embedding}' is not one of {', '.join(EMBEDDINGS)}")
    model, untie = untie_lm_head(model)
    skipped = resolve_exclude(model, exclude)
    emb_info: dict = {}
    if embedding == "int8":
        model, emb_info = int8_embedding(model)
    op_types = ("MatMul", "Gather") if embedding == "int4" else ("MatMul",)
    head = lm_head_nodes(model) if head_bits != bits else []
    head = [h for h in head if h not in skipped]
    qmodel = _matmul_nbits(model, bits, block_size, symmetric, accuracy_level, op_types, exclude=skipped + head)
    if head:
        qmodel = _matmul_nbits(qmodel, head_bits, block_size, symmetric, accuracy_level, ("MatMul",), include=head)
    if embedding == "tied":
        qmodel, emb_info = share_tied_nbits(qmodel)
        emb_info = {"tied_embedding": emb_info}
        if not emb_info["tied_embedding"]["shared"]:  # untied or excluded head: a table of its own
            qmodel, more = int8_embedding(qmodel)
            emb_info.update(more)
    desc = describe(qmodel)
    info = {
        "mode": f"int{bits}",
        "op": "MatMulNBits",
        "bits": bits,
        "head_bits": head_bits,
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        "symmetric": symmetric,
        "embedding": embedding,
        **emb_info,
        "lm_head_untied": [u["weight"] for u in untie["untied"]],
        "excluded": skipped,
        "quantized_matmuls": desc["weight_matmuls"]["quantized"],
        "skipped_matmuls": desc["weight_matmuls"]["float"],
        "float_weight_fraction": round(desc["weight_bytes"]["float_fraction"], 4),
    }
    return qmodel, info


def _matmul_nbits(model, bits, block_size, symmetric, accuracy_level, op_types, exclude=(), include=None):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    config = mnb.DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=accuracy_level,
        op_types_to_quantize=op_types,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
        bits=bits,
    )
    try:
        with quiet_ort_logging():
            quantizer = mnb.MatMulNBitsQuantizer(
                model,
                bits=bits,
                block_size=block_size,
                is_symmetric=symmetric,
                accuracy_level=accuracy_level,
                nodes_to_exclude=list(exclude),
                nodes_to_include=include,
                op_types_to_quantize=op_types,
                quant_axes=(("MatMul", 0), ("Gather", 1)),
                algo_config=config,
            )
            quantizer.process()
    except OSError:
        raise
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise QuantError(f"INT{bits} quantization failed ({type(e).__name__}: {reason}); check the onnxruntime version") from None
    return quantizer.model.model
