"""Which CPU kind this is, for results that depend on it (int8 kernels differ between AVX2, AVX-512 and VNNI)."""

from __future__ import annotations

import platform
from pathlib import Path

#: Flags that select ONNX Runtime's integer and float kernels (x86 and ARM spellings from /proc/cpuinfo).
KERNEL_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_int8",
    "asimd",
    "asimddp",
    "i8mm",
)


def _cpuinfo() -> tuple[str, set[str]]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return name, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware") and value.strip():
            name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return name, flags


def cpu_kind() -> dict:
    """``{"cpu": model name, "arch": machine, "kind": int8 kernel family, "flags": [kernel-relevant flags]}``.

    ``kind``: "vnni" (exact 32-bit int8 dot products), "avx512" or "avx2" (u8 x s8 pairs in saturating
    16-bit lanes), "arm", or the machine name when none of these applies."""
    name, flags = _cpuinfo()
    arch = platform.machine().lower()
    if flags & {"avx512_vnni", "avx_vnni"}:
        kind = "vnni"
    elif "avx512bw" in flags or "avx512f" in flags:
        kind = "avx512"
    elif "avx2" in flags:
        kind = "avx2"
    elif arch in ("aarch64", "arm64") or "asimd" in flags:
        kind = "arm"
    else:
        kind = arch or "unknown"
    return {"cpu": name, "arch": arch, "kind": kind, "flags": sorted(flags & set(KERNEL_FLAGS))}
