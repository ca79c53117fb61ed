"""gpt2deploy: ship GPT-2-family models through ONNX Runtime.

Importing this package (and loading/generating) needs only onnxruntime, numpy and tokenizers.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path, variant=None, device="auto", threads=None, verify=True):
    """Load a package for generation. See :func:`gpt2deploy.runtime.model.load`."""
    from .runtime.model import load as _load

    return _load(path, variant=variant, device=device, threads=threads, verify=verify)
