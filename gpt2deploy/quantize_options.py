"""`gpt2deploy quantize` options, checked once into a ``QuantizeOptions`` before any work is done."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import UsageError

MODES = ("int8", "int4", "fp16")
#: The attention op each mode's graph gets by default ("gqa" or "mha", option ``attention``).
#: GroupQueryAttention takes an in-place KV buffer and is the fastest on CPU, but ONNX Runtime's CUDA
#: kernel rejects the padding-mask bias it is given, so it makes a CPU-only variant; MultiHeadAttention
#: runs on both. The CUDA fp16 variant therefore uses MHA; ``attention="mha"`` makes a CUDA-capable int4.
ATTENTION = {"int8": "gqa", "int4": "gqa", "fp16": "mha"}
ATTENTION_OPS = {"gqa": "GroupQueryAttention", "mha": "MultiHeadAttention"}
#: int8 weight granularities: per tensor and per channel (DynamicQuantizeMatMul), or 8-bit MatMulNBits blocks.
GRANULARITIES = ("tensor", "channel", "block")
#: Options each pass takes; ``OPTIONS`` are all that ``quantize_package`` accepts.
INT8_PASS_OPTIONS = ("reduce_range", "share_embedding", "quantize_embedding")
NBITS_PASS_OPTIONS = (
    "accuracy_level",
    "bits",
    "head_bits",
    "head_block_size",
    "head_symmetric",
    "embedding",
    "symmetric",
)
OPTIONS = {"granularity", "attention", *INT8_PASS_OPTIONS, *NBITS_PASS_OPTIONS}


@dataclass(frozen=True)
class QuantizeOptions:
    """Validated options of one quantization: which pass runs, with what."""

    mode: str
    #: int8 only: "tensor", "channel" or "block"; None for int4/fp16
    granularity: str | None
    per_channel: bool
    block_size: int
    exclude: list[str]
    #: "gqa" or "mha"
    attention: str
    #: the remaining pass options (see ``INT8_PASS_OPTIONS``, ``NBITS_PASS_OPTIONS``)
    extra: dict = field(default_factory=dict)

    @property
    def attention_op(self) -> str:
        return ATTENTION_OPS[self.attention]

    @property
    def int8_blocks(self) -> bool:
        return self.mode == "int8" and self.granularity == "block"

    @classmethod
    def parse(
        cls,
        mode: str,
        per_channel: bool = False,
        block_size: int | None = None,
        exclude: Iterable[str] = (),
        **options,
    ) -> QuantizeOptions:
        """Check the arguments of ``quantize_package``; raise UsageError naming the problem and the fix."""
        from quant.blocks import INT8_BLOCK_SIZE
        from quant.errors import QuantError
        from quant.nbits import DEFAULT_BLOCK_SIZE, check_block_size

        if mode not in MODES:
            raise UsageError(f"unknown mode '{mode}'; choose one of {', '.join(MODES)}")
        granularity = options.pop("granularity", None)
        if granularity is not None and mode != "int8":
            raise UsageError(f"--granularity applies to int8 only; drop it for {mode}")
        if mode == "int8":
            if granularity not in (None, *GRANULARITIES):
                raise UsageError(f"unknown granularity '{granularity}'; choose one of {', '.join(GRANULARITIES)}")
            if per_channel and granularity not in (None, "channel"):
                raise UsageError(f"--per-channel and --granularity {granularity} disagree; pass one of them")
            granularity = granularity or ("channel" if per_channel else "tensor")
            per_channel = granularity == "channel"
            if block_size is not None and granularity != "block":
                raise UsageError("--block-size applies to int8 only with --granularity block; drop it or add that")
        if block_size is None:
            block_size = INT8_BLOCK_SIZE if granularity == "block" else DEFAULT_BLOCK_SIZE
        try:
            check_block_size(block_size)
        except QuantError as e:
            raise UsageError(str(e)) from None
        if per_channel and mode != "int8":
            raise UsageError(f"--per-channel applies to int8 only; drop it for {mode}")
        if "head_bits" in options and mode != "int4":
            raise UsageError(f"--head-bits applies to int4 only; drop it for {mode}")
        if options.get("head_bits", 4) not in (4, 8):
            raise UsageError(f"--head-bits must be 4 or 8 (got {options['head_bits']})")
        if "share_embedding" in options and (mode != "int8" or granularity == "block"):
            raise UsageError(
                "--untie-lm-head applies to int8 with per-tensor or per-channel scales; drop it"
                + (" or drop --granularity block" if mode == "int8" else f" for {mode}")
            )
        attention = options.pop("attention", None) or ATTENTION.get(mode, "gqa")
        if attention not in ATTENTION_OPS:
            raise UsageError(
                f"unknown attention '{attention}'; choose gqa (CPU, in-place KV cache) or mha (CPU and CUDA)"
            )
        unknown = set(options) - OPTIONS
        if unknown:
            raise UsageError(
                f"unknown quantize option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(OPTIONS))}"
            )
        return cls(
            mode=mode,
            granularity=granularity,
            per_channel=per_channel,
            block_size=block_size,
            exclude=[e.strip() for e in (exclude or ()) if e and e.strip()],
            attention=attention,
            extra=dict(options),
        )

    def pass_options(self, names: Iterable[str]) -> dict:
        return {k: self.extra[k] for k in names if k in self.extra}
