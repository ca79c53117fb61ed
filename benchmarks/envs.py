"""Separate Python environments for peers whose requirements clash with the main one.

Optimum's ORTModelForCausalLM (optimum-onnx) needs transformers<4.58, while gpt2deploy's exporter uses
transformers 5, so Optimum runs in its own virtual environment under benchmarks/.work/, created on first use.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

OPTIMUM_REQUIREMENTS = ["torch==2.13.0", "transformers<4.58", "optimum-onnx", "onnxruntime"]


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def ensure_venv(venv: Path, requirements: list[str], log: Path, say=print) -> tuple[Path | None, str]:
    """Create ``venv`` with ``requirements`` once (a ``.ready`` marker records success).

    Returns (python, "") when usable, or (None, reason) when creation or installation failed.
    """
    marker = venv / ".ready"
    wanted = "\n".join(requirements)
    if marker.is_file() and marker.read_text() == wanted and venv_python(venv).is_file():
        return venv_python(venv), ""
    say(f"creating {venv} with {' '.join(requirements)} (once; log in {log})")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            [str(venv_python(venv)), "-m", "pip", "install", "--quiet", *requirements],
        ]
        for cmd in steps:
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
            if code != 0:
                tail = _last_line(log)
                return None, f"'{' '.join(cmd[-len(requirements) :] if 'pip' in cmd else cmd)}' failed ({tail})"
    marker.write_text(wanted)
    return venv_python(venv), ""


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"
