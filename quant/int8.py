"""INT8 for CPU: dynamic quantization of every weight MatMul, the lm_head included.

Weights are stored as int8 (symmetric), activations are quantized to uint8 per call
(``DynamicQuantizeLinear`` -> ``MatMulInteger``, fused by ONNX Runtime into ``DynamicQuantizeMatMul``).
``per_channel`` keeps one scale per output column instead of one per matrix (more accurate).

Reduce-range: u8 x s8 products use 16-bit accumulation pairs on x86 CPUs without VNNI (AVX2 or
AVX-512 without VNNI), which can saturate; ``reduce_range=True`` quantizes weights to 7 bits to avoid
that at some accuracy cost. CPUs with AVX-VNNI / AVX512-VNNI, and ARM, don't need it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .exclude import lm_head_nodes, resolve_exclude
from .lm_head import untie_lm_head
from .ort import failure, quiet_ort_logging
from .report import HeadResult, PassResult, pass_result, weight_bytes
from .tied import int8_embedding, share_tied_int8


def cpu_has_vnni() -> bool | None:
    """True/False on Linux x86 (from /proc/cpuinfo), None when unknown."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    if "flags" not in flags:
        return None
    return "avx512_vnni" in flags or "avx_vnni" in flags


def quantize_int8(
    model,
    per_channel: bool = False,
    reduce_range: bool = False,
    exclude=(),
    share_embedding: bool = True,
    quantize_embedding: bool = True,
    workdir=None,
) -> tuple[object, PassResult]:
    """Return ``(model, result)``; ``model`` is an optimized fp32 decoder graph (see ``optimize``).

    ``share_embedding`` (default) stores the tied embedding/lm_head once, as an int8 table in blocks of
    ``quant.blocks.INT8_BLOCK_SIZE``: the weight of an 8-bit ``MatMulNBits`` lm_head whose rows the embedding lookup
    reads (see ``quant.tied``). The smallest file and the most accurate logits.

    ``share_embedding=False`` unties the lm_head into its own weight, quantized like every other MatMul
    (``DynamicQuantizeMatMul``, one scale per matrix or per column): on x86 2.2x faster at a batch of 8 on the
    lm_head alone (1.4x at one row, where the whole step shows no measurable change), less accurate logits,
    and the largest matrix stored twice;
    the embedding lookup then gets its own int8 table with one scale per row (``quantize_embedding``;
    ``False`` keeps it fp32), of which the process reads only the looked-up rows (see ``quant.mapped``).
    With the default ``share_embedding`` and the lm_head excluded, the embedding stays fp32.
    """
    import onnx
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tied = {"shared": False, "reason": "disabled"}
    head = lm_head_nodes(model)
    keep_head = bool(head) and head[0] in resolve_exclude(model, exclude)  # e.g. "lm_head" or the weight's name
    if share_embedding and not keep_head:
        model, tied = share_tied_int8(model)
    model, untie = untie_lm_head(model)
    embedding = {"int8_embedding": []}
    if quantize_embedding and not share_embedding:  # (a shared table excluded as lm_head stays fp32, as before)
        model, embedding = int8_embedding(model)
    skipped = resolve_exclude(model, exclude)
    op_types = ["MatMul", "Gemm"]
    with tempfile.TemporaryDirectory(prefix="gpt2deploy-int8-", dir=workdir) as tmp:
        out = Path(tmp) / "int8.onnx"
        try:
            with quiet_ort_logging():
                quantize_dynamic(
                    model,
                    out,
                    op_types_to_quantize=op_types,
                    per_channel=per_channel,
                    reduce_range=reduce_range,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=skipped,
                    use_external_data_format=True,
                    extra_options={"DefaultTensorType": TensorProto.FLOAT, "MatMulConstBOnly": True},
                )
        except OSError:
            raise
        except Exception as e:
            raise failure("INT8 quantization failed", e, "check the onnxruntime version") from None
        qmodel = onnx.load(str(out), load_external_data=True)
    details = {
        "weight_type": "int8",
        "activation_type": "uint8 (dynamic)",
        "per_channel": per_channel,
        "reduce_range": reduce_range,
        "quantize_embedding": bool(embedding["int8_embedding"]) or bool(tied.get("shared")),
        "embedding_rows_int8": [e["weight"] for e in embedding["int8_embedding"]],
        "tied_embedding": tied,
        "cpu_vnni": cpu_has_vnni(),
        "lm_head_untied": [u["weight"] for u in untie["untied"]],
        "weight_bytes": weight_bytes(qmodel)["by_type"],
    }
    shared = bool(tied.get("shared"))
    head = HeadResult(8, tied.get("block_size") if shared else None, True, shared)
    return qmodel, pass_result(
        "int8", qmodel, skipped, details, head=head, cpu_vnni=details["cpu_vnni"], reduce_range=reduce_range
    )
