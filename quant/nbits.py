"""The n-bit pass (4 or 8 bits): weight-only block quantization with ``MatMulNBits``, the lm_head included.

It makes the int4 variant (``bits=4``, CPU and CUDA) and int8 ``granularity="block"`` (``bits=8``, symmetric).
Each weight MatMul becomes ``MatMulNBits`` (``bits``-bit weights in blocks of ``block_size`` along K, one
scale and zero point per block); activations stay float. The tied token embedding (a lookup, not a
MatMul) by default reads the lm_head's own quantized blocks (``embedding="tied"``, see ``quant.tied``):
the largest matrix is stored once. Alternatives: ``"int8"`` a separate int8 table with one scale per
row, ``"int4"`` a separate ``GatherBlockQuantized`` table, ``"fp32"`` the float table. Gemms are rewritten to
MatMul + Add by ``optimize`` first, because MatMulNBits only replaces MatMul.

The lm_head is quantized with ``head_bits`` (default 4: everything 4-bit, smallest and fastest);
``head_bits=8`` keeps the logits, the most sensitive output, and the tied embedding in 8-bit blocks.

``accuracy_level`` picks the CPU compute type: 0/1 unpack to fp32 (exact, slower), 4 quantizes the
activations to int8 per block and uses integer dot products (fastest on x86 with VNNI and on ARM).
"""

from __future__ import annotations

from .bias import fold_matmul_bias
from .blocks import INT8_BLOCK_SIZE, pow2_block
from .errors import QuantError
from .exclude import lm_head_nodes, resolve_exclude
from .graph import initializers
from .lm_head import untie_lm_head
from .ort import failure, quiet_ort_logging
from .report import HeadResult, PassResult, pass_result
from .tied import int8_embedding, share_tied_nbits

#: Blocks of 32 along K. Larger blocks read fewer bytes a step (about 8% faster decode at 128) but ONNX Runtime
#: then computes a single row and several rows with different kernels, whose float sums differ in the last
#: bits; the int8-quantized activations of the next MatMul turn that into different tokens now and then, so
#: a batch row or a served request would no longer give exactly what it gives alone. Blocks of 32 (and 16) use
#: one kernel for any number of rows (measured: ``benchmarks/decode_profile.py``, see benchmarks/RESULTS.md).
DEFAULT_BLOCK_SIZE = 32
DEFAULT_ACCURACY_LEVEL = 4
#: Symmetric blocks (no zero points; the implicit zero point is the middle of the range): the same accuracy as
#: asymmetric blocks on gpt2-ref int4 (perplexity +1.9% vs +2.3%, top-1 88.9% vs 88.6%), 2% fewer bytes and
#: about 5% faster decode (the kernels skip the zero-point terms); one row and many still agree exactly.
DEFAULT_SYMMETRIC = True
#: The lm_head (and with it the tied embedding) of a 4-bit model in 4-bit blocks: the largest matrix, read
#: every step (over 40% of a step's bytes in 8 bits); ``head_bits=8`` keeps it in 8-bit blocks (more accurate
#: logits, a slower decode).
DEFAULT_HEAD_BITS = 4
#: The lm_head of a 4-bit model (tied table) is quantized in blocks of 128 (symmetric when 8-bit, the int8
#: variant's layout): fewer bytes than blocks of 32 at about the same accuracy, and it is the last MatMul, so
#: its kernels' last-bit differences reach no other quantization (measured as above).
DEFAULT_HEAD_BLOCK_SIZE = INT8_BLOCK_SIZE
EMBEDDINGS = ("tied", "int8", "int4", "fp32")


def check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise QuantError(
            f"block size {block_size} is not a power of two >= 16; pass --block-size 16, 32, 64, 128 or 256"
        )


def quantize_nbits(
    model,
    block_size: int = DEFAULT_BLOCK_SIZE,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    bits: int = 4,
    symmetric: bool = DEFAULT_SYMMETRIC,
    exclude=(),
    embedding: str = "tied",
    head_bits: int | None = None,
    head_block_size: int | None = None,
    head_symmetric: bool | None = None,
) -> tuple[object, PassResult]:
    """Return ``(model, result)``; ``model`` is an optimized fp32 decoder graph (see ``optimize``).

    ``bits`` (4 or 8) for the body. The lm_head (and the tied embedding that reads its blocks) gets
    ``head_bits`` in blocks of ``head_block_size`` (default ``block_size``), ``head_symmetric`` (default ``symmetric``).
    """
    check_block_size(block_size)
    head_bits = (DEFAULT_HEAD_BITS if bits == 4 else bits) if head_bits is None else head_bits
    eight = head_bits == 8 and bits == 4
    own_head = bits == 4  # a 4-bit body's lm_head gets blocks of its own (DEFAULT_HEAD_BLOCK_SIZE)
    default_head_block = head_block_size is None
    head_block_size = (DEFAULT_HEAD_BLOCK_SIZE if own_head else block_size) if default_head_block else head_block_size
    head_symmetric = (True if eight else symmetric) if head_symmetric is None else head_symmetric
    check_block_size(head_block_size)
    if bits not in (4, 8) or head_bits not in (4, 8):
        raise QuantError(
            f"MatMulNBits supports 4 or 8 bits, not {bits if bits not in (4, 8) else head_bits}; pass 4 or 8"
        )
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise QuantError(
            f"accuracy_level {accuracy_level} is not one of 0-4; pass 0 (fp32 compute) or 4 (int8 compute)"
        )
    if embedding not in EMBEDDINGS:
        raise QuantError(f"embedding '{embedding}' is not one of {', '.join(EMBEDDINGS)}")
    model, untie = untie_lm_head(model)
    if default_head_block and own_head:  # no padding past K on narrow models
        k = _head_k(model)
        head_block_size = (
            max(min(head_block_size, pow2_block(k, head_block_size)), block_size) if k else head_block_size
        )
    skipped = resolve_exclude(model, exclude)
    emb_info: dict = {}
    if embedding == "int8":
        model, emb_info = int8_embedding(model)
    op_types = ("MatMul", "Gather") if embedding == "int4" else ("MatMul",)
    head = lm_head_nodes(model) if (head_bits, head_block_size, head_symmetric) != (bits, block_size, symmetric) else []
    head = [h for h in head if h not in skipped]
    qmodel = _matmul_nbits(model, bits, block_size, symmetric, accuracy_level, op_types, exclude=skipped + head)
    if head:
        qmodel = _matmul_nbits(
            qmodel, head_bits, head_block_size, head_symmetric, accuracy_level, ("MatMul",), include=head
        )
    if embedding == "tied":
        qmodel, emb_info = share_tied_nbits(qmodel)
        emb_info = {"tied_embedding": emb_info}
        if not emb_info["tied_embedding"]["shared"]:  # untied or excluded head: a table of its own
            qmodel, more = int8_embedding(qmodel)
            emb_info.update(more)
    folded = fold_matmul_bias(qmodel)
    details = {
        "op": "MatMulNBits",
        "bias_folded": folded,
        "bits": bits,
        "head_bits": head_bits,
        "head_block_size": head_block_size,
        "head_symmetric": head_symmetric,
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        "symmetric": symmetric,
        "embedding": embedding,
        **emb_info,
        "lm_head_untied": [u["weight"] for u in untie["untied"]],
    }
    tied = bool((emb_info.get("tied_embedding") or {}).get("shared"))
    head_result = HeadResult(head_bits, head_block_size, head_symmetric, tied)
    return qmodel, pass_result(f"int{bits}", qmodel, skipped, details, head=head_result)


def _head_k(model) -> int | None:
    """K (the hidden size) of the lm_head MatMul's constant weight, if there is one."""
    heads = lm_head_nodes(model)
    inits = initializers(model)
    node = next((n for n in model.graph.node if heads and n.name == heads[0]), None)
    if node is None or node.input[1] not in inits or len(inits[node.input[1]].dims) != 2:
        return None
    return int(inits[node.input[1]].dims[0])


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
        raise failure(f"INT{bits} quantization failed", e, "check the onnxruntime version") from None
    return quantizer.model.model
