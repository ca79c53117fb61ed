"""Which variant to load on which device, read from the manifest alone.

CPU: the fastest variant present that did not fail its accuracy gate: int4 (MatMulNBits), then int8
(dynamic quantized MatMuls), then fp32. The order comes from decode speed measured on a GPT-2-small-shaped
package (``benchmarks/runtime_decode.py --variants int4,int8,fp32``, ``benchmarks/quant_decode.py --recipes``;
numbers in ``benchmarks/RESULTS.md``). fp16 is never picked on CPU: the CPU execution provider runs it slower
than fp32.
CUDA: fp16 when present and not failed, else fp32 (then int4, int8 as a last resort).
"""

from __future__ import annotations

from ..compat import runtime_problem
from ..errors import VariantError

CPU_PREFERENCE = ("int4", "int8", "fp32")
CUDA_PREFERENCE = ("fp16", "fp32", "int4", "int8")
_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def gate_failed(entry: dict) -> bool:
    """True when the variant was checked and failed its accuracy gate (unchecked variants are not failed)."""
    acc = entry.get("accuracy")
    return isinstance(acc, dict) and acc.get("passed") is False


def _runs_on(entry: dict, device: str) -> bool:
    providers = entry.get("providers")
    return not providers or _PROVIDER[device] in providers


def select_variant(manifest: dict, device: str) -> tuple[str, str]:
    """``(variant name, reason)`` for ``device`` ('cpu' or 'cuda'). Raises VariantError when none is usable."""
    variants = manifest.get("variants", {})
    order = CUDA_PREFERENCE if device == "cuda" else CPU_PREFERENCE
    skipped = []
    for name in order:
        entry = variants.get(name)
        if entry is None:
            continue
        if gate_failed(entry):
            skipped.append(f"{name} failed its accuracy gate")
            continue
        if not _runs_on(entry, device):
            skipped.append(f"{name} is not built for {device}")
            continue
        problem = runtime_problem(entry)
        if problem:
            skipped.append(f"{name} {problem}")
            continue
        if device == "cuda":
            why = (
                "fp16 is the CUDA variant"
                if name == "fp16"
                else f"no usable fp16 variant, {name} is next (preference {' > '.join(order)})"
            )
        else:
            why = f"{name} is the fastest CPU variant present (preference {' > '.join(order)})"
        checked = " and passed its accuracy gate" if isinstance(entry.get("accuracy"), dict) else ""
        note = f"; skipped: {', '.join(skipped)}" if skipped else ""
        return name, f"auto on {device}: {why}{checked}{note}"
    present = ", ".join(sorted(variants)) or "none"
    why = f" ({'; '.join(skipped)})" if skipped else ""
    fp16_only = device == "cpu" and set(variants) <= {"fp16"} and variants
    if fp16_only:
        hint = "fp16 is not run on CPU automatically; pass --variant fp16 to force it"
    elif device == "cuda":
        hint = (
            "add a CUDA variant with 'gpt2deploy quantize PACKAGE --mode fp16' (or --mode int4 --attention mha), or "
            "use --device cpu"
        )
    elif any("needs onnxruntime" in s for s in skipped):
        hint = "upgrade onnxruntime (pip install -U onnxruntime) or rebuild the package with this gpt2deploy"
    else:
        hint = "rebuild the package or pass --variant"
    raise VariantError(f"no variant usable on {device} in this package (present: {present}){why}; {hint}")
