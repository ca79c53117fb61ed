"""Versions of the libraries that produced or run a variant, recorded in the manifest."""

from __future__ import annotations

from importlib import metadata

_LIBS = ("gpt2deploy", "onnxruntime", "onnx", "torch", "transformers", "onnxscript", "numpy", "tokenizers")


def library_versions(names: tuple[str, ...] = _LIBS) -> dict:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
