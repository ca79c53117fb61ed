"""Which variants the installed ONNX Runtime can run, from the manifest alone (no onnx import).

A variant entry may carry ``requires: {"onnxruntime": "1.22"}`` (derived from the graph when it is written,
see ``quant.requirements``) and ``providers`` (the execution providers its ops run on). Packages written
before ``requires`` existed have none and are not checked here; ONNX Runtime's own load error is then
translated by ``load_error``.
"""

from __future__ import annotations

import re

from quant.versions import version_tuple

RUNTIME = "onnxruntime"


def installed_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def installed_distribution() -> str:
    """The pip name of the installed runtime: onnxruntime, onnxruntime-gpu, ... ("onnxruntime" if unknown)."""
    from importlib import metadata

    for name in ("onnxruntime-gpu", "onnxruntime", "onnxruntime-directml", "onnxruntime-openvino"):
        try:
            metadata.version(name)
            return name
        except metadata.PackageNotFoundError:
            continue
    return RUNTIME


def required_version(entry: dict) -> str | None:
    """The variant's ``requires.onnxruntime`` as a string, or None when absent or malformed."""
    req = entry.get("requires") if isinstance(entry, dict) else None
    need = req.get(RUNTIME) if isinstance(req, dict) else None
    return need if isinstance(need, str) and version_tuple(need) else None


def runtime_problem(entry: dict, installed: str | None = None) -> str:
    """ "" when the installed runtime meets the variant's requirement, else "needs onnxruntime >= X (installed Y)"."""
    need = required_version(entry)
    if need is None:
        return ""
    have = installed or installed_version()
    if version_tuple(have) >= version_tuple(need):
        return ""
    return f"needs {RUNTIME} >= {need} (installed {have})"


def runnable(manifest: dict, installed: str | None = None) -> list[str]:
    """Variants of the manifest whose requirement the installed runtime meets, in manifest order."""
    return [n for n, e in manifest.get("variants", {}).items() if not runtime_problem(e, installed)]


def requirement_error(name: str, entry: dict, manifest: dict, installed: str | None = None) -> str:
    """One line for an explicitly requested variant the installed runtime cannot run (see ``runtime_problem``)."""
    have = installed or installed_version()
    need = required_version(entry)
    others = [n for n in runnable(manifest, have) if n != name]
    alt = f"load variant {others[0]} (--variant {others[0]}) which runs here, or " if others else ""
    return (
        f"variant {name} needs {RUNTIME} >= {need} but {installed_distribution()} {have} is installed; "
        f"{alt}upgrade: pip install -U '{installed_distribution()}>={need}'"
    )


_OP = re.compile(
    r"(?:Could not find an implementation for |No opset import for domain|not a registered function/op|"
    r"has input size \d+ not in range)"
)


def load_error(name: str, message: str, manifest: dict) -> str | None:
    """A one-line explanation when ONNX Runtime refused a graph for an op it lacks, else None."""
    if not _OP.search(message):
        return None
    m = re.search(r'\(\s*"?([^",()]*)"?\s*,\s*(\w+)\s*,\s*"([\w.]*)"', message)
    op = f"{m.group(3) + '.' if m and m.group(3) else ''}{m.group(2)}" if m else "an operator"
    have = installed_version()
    variants = manifest.get("variants", {})
    others = [n for n in runnable(manifest, have) if n != name and required_version(variants[n])]
    alt = f"try variant {others[0]}, or " if others else ""
    return (
        f"variant {name} uses {op} in a form onnxruntime {have} does not have; "
        f"{alt}upgrade onnxruntime (pip install -U onnxruntime) or rebuild the package with this gpt2deploy"
    )


def graph_ragged_rows(path) -> bool:
    """Whether the graph at ``path`` takes decode steps whose rows hold different lengths (writers: needs onnx)."""
    import onnx

    from quant.attention import ragged_rows

    return ragged_rows(onnx.load(str(path), load_external_data=False))


def graph_requires(path) -> dict:
    """``{"onnxruntime": "1.xx"}``: the oldest ONNX Runtime that loads the graph at ``path`` (writers: needs onnx)."""
    import onnx

    from quant.requirements import requirement

    need = requirement(onnx.load(str(path), load_external_data=False))
    return {"onnxruntime": need["onnxruntime"]}
