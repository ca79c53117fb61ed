"""The one results file: ``benchmarks/RESULTS.md``, written by the harnesses from a run, never by hand.

Every harness that measures something calls :func:`record` with its section name, the command line that
produced it and a markdown body (tables). The section is replaced in place, stamped with the date, the
commit, the machine (CPU model, cores, the SIMD flags that change ONNX Runtime's int8 kernels, load average)
and the command, so a number in the file always says where it came from. The README links here instead of
copying figures.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "sve")
_HEADER = (
    "# Measurements\n\n"
    "Written by the benchmark harnesses (`benchmarks/*.py`), one section per harness, replaced by its next run.\n"
    "Speed is only comparable within one section: each compares engines or settings in the same run.\n"
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD flags that decide which int8/int4 kernels ONNX Runtime and llama.cpp use on this CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    m = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.M)
    have = set(m.group(1).split()) if m else set()
    return [f for f in _FLAGS if f in have]


def cpu_kind_label() -> str:
    """The CPU kind a section's figures hold for, as it goes in a section name: int8 and int4 kernels (ONNX
    Runtime's and llama.cpp's alike) differ between these, so each kind keeps its own section."""
    have = set(cpu_flags())
    if have & {"avx512_vnni", "avx_vnni"}:
        return "AVX-512 VNNI" if "avx512f" in have else "AVX-VNNI"
    if "avx512f" in have:
        return "AVX-512 without VNNI"
    if "avx2" in have:
        return "AVX2"
    return platform.machine() or "unknown CPU"


def per_cpu_kind(section: str) -> str:
    """``section`` named for this CPU kind: "Name (kind)", or "Name (what, kind)" when it has a parenthesis."""
    kind = cpu_kind_label()
    return f"{section[:-1]}, {kind})" if section.endswith(")") else f"{section} ({kind})"


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "flags": cpu_flags(),
        "load_1m": round(load[0], 2),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def commit() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + ("-dirty" if dirty else "")


def stamp(command: str | None = None) -> str:
    """The provenance lines every section starts with."""
    m = machine()
    cmd = command or " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])
    flags = ", ".join(m["flags"]) or "none of " + "/".join(_FLAGS[:4])
    return (
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n"
        f"- commit: {commit()}\n"
        f"- machine: {m['cpu']}, {m['cores']} cores, flags {flags}, load {m['load_1m']} (1 min), {m['os']}, "
        f"Python {m['python']}\n"
        f"- command: `{cmd}`\n"
    )


def _split(text: str) -> tuple[str, list[tuple[str, str]]]:
    parts = re.split(r"^<!-- section: (.+?) -->\n", text, flags=re.M)
    head, sections = parts[0], []
    for i in range(1, len(parts) - 1, 2):
        sections.append((parts[i], parts[i + 1]))
    return head, sections


def record(section: str, body: str, command: str | None = None, path: Path = RESULTS) -> Path:
    """Replace (or append) ``section`` of the results file with the stamp and ``body``; atomic."""
    if not re.fullmatch(r"[A-Za-z0-9 _.,()/+-]{1,80}", section):
        raise ValueError(f"section name {section!r}: use letters, digits and simple punctuation")
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else _HEADER
    head, sections = _split(text)
    block = f"## {section}\n\n{stamp(command)}\n{body.strip()}\n\n"
    sections = [(n, block if n == section else b) for n, b in sections]
    if section not in {n for n, _ in sections}:
        sections.append((section, block))
    out = head.rstrip("\n") + "\n\n" + "".join(f"<!-- section: {n} -->\n{b}" for n, b in sections)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(out, encoding="utf-8")
    os.replace(tmp, path)
    return path


def md_table(header: list[str], rows: list[list[object]]) -> str:
    def cell(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
