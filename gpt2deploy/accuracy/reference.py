"""The models a check compares: package variants (ONNX Runtime) and the reference they are measured against.

A reference is a variant of the checked package (default ``fp32``), another package directory (its fp32
variant), or a Hugging Face checkpoint directory run in PyTorch (needs the ``export`` extra; torch and
transformers are imported only here). Every model offers ``forward(ids, mask, pos, past) -> (logits, present)``
and ``empty_past(batch)`` over numpy arrays.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..manifest import MANIFEST_NAME
from ..package import Package

#: The dims that must match between a package and its reference.
MATCHED_DIMS = ("vocab_size", "n_layer", "n_head", "hidden_size", "n_positions")


class OnnxModel:
    """A package variant in an ONNX Runtime session."""

    kind = "variant"

    def __init__(self, package: Package, variant: str, device: str = "cpu", threads: int | None = None):
        from ..runtime.session import DecoderSession

        self.session = DecoderSession(package, variant, device=device, threads=threads)
        self.package = package
        self.variant = variant
        self.dims = package.dims

    def forward(self, ids, mask=None, pos=None, past=None):
        return self.session.forward(ids, mask, pos, past)

    def empty_past(self, batch: int):
        return self.session.empty_past(batch)


class TorchModel:
    """A Hugging Face GPT-2 checkpoint run in PyTorch (fp32, eval), with a KV cache."""

    kind = "pytorch"

    def __init__(self, model_dir: str):
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            raise UsageError(
                "--reference MODEL_DIR runs the checkpoint in PyTorch, which is not installed; "
                "pip install 'gpt2deploy[export]' or use the package's fp32 variant (--reference fp32)"
            ) from None
        import exporters
        from exporters.onnx_export import CachedLM

        ckpt = exporters.locate(model_dir)
        self.checkpoint = ckpt
        self.model = exporters.load_model(ckpt)
        self.fn = CachedLM(self.model)
        dims = exporters.model_dims(self.model.config)
        self.dims_dict = dims
        self.source = ckpt.source
        self.weights_sha256 = ckpt.weights_sha256()

    def empty_past(self, batch: int):
        d = self.dims_dict
        return [np.zeros((batch, d["n_head"], 0, d["head_dim"]), np.float32) for _ in range(2 * d["n_layer"])]

    def forward(self, ids, mask=None, pos=None, past=None):
        import torch

        from ..runtime.session import positions_from_mask

        ids = np.asarray(ids, dtype=np.int64)
        batch, seq = ids.shape
        past = self.empty_past(batch) if past is None else past
        total = past[0].shape[2] + seq
        mask = np.ones((batch, total), np.int64) if mask is None else np.asarray(mask, np.int64)
        pos = positions_from_mask(mask)[:, -seq:] if pos is None else np.asarray(pos, np.int64)
        with torch.no_grad():
            out = self.fn(
                torch.from_numpy(ids),
                torch.from_numpy(mask),
                torch.from_numpy(pos),
                [torch.from_numpy(np.ascontiguousarray(p)) for p in past],
            )
        out = [t.numpy() for t in out]
        return out[0], out[1:]


def _dims_of_package(pkg: Package) -> dict:
    d = pkg.dims
    return {k: getattr(d, k) for k in MATCHED_DIMS}


def check_same_model_shape(pkg: Package, ref_dims: dict, what: str) -> None:
    """UsageError when the reference's vocabulary or dims differ from the package's."""
    mine = _dims_of_package(pkg)
    diff = [f"{k} {ref_dims.get(k)} vs {mine[k]}" for k in MATCHED_DIMS if ref_dims.get(k) != mine[k]]
    if diff:
        vocab = "vocabulary and dims" if ref_dims.get("vocab_size") != mine["vocab_size"] else "dims"
        raise UsageError(
            f"reference {what} has different {vocab} than package {pkg.root} ({', '.join(diff)}); "
            "pass the checkpoint this package was exported from, or --reference fp32"
        )


def open_reference(pkg: Package, reference: str | os.PathLike, device: str = "cpu", threads: int | None = None):
    """(model, description dict) for ``reference``: a variant name of ``pkg``, a package dir or a checkpoint dir."""
    ref = str(reference)
    if ref in pkg.variants:
        desc = {"kind": "variant", "variant": ref}
        return OnnxModel(pkg, ref, device, threads), desc
    path = Path(ref).expanduser()
    if not path.exists():
        present = ", ".join(sorted(pkg.variants))
        raise UsageError(
            f"reference '{ref}' is neither a variant of the package (present: {present}) nor an existing directory; "
            "pass --reference fp32 or the checkpoint directory the package was exported from"
        )
    if not path.is_dir():
        raise UsageError(f"reference {path} is a file; pass a package or Hugging Face checkpoint directory")
    if (path / MANIFEST_NAME).is_file():
        other = Package.open(path)
        other_dims = _dims_of_package(other)
        check_same_model_shape(pkg, other_dims, f"package {path}")
        if "fp32" not in other.variants:
            raise UsageError(
                f"reference package {path} has no fp32 variant; pass a package exported with 'gpt2deploy export'"
            )
        desc = {"kind": "package", "variant": "fp32", "source": str(other.root)}
        return OnnxModel(other, "fp32", device, threads), desc
    if not (path / "config.json").is_file():
        raise UsageError(
            f"reference {path} is neither a gpt2deploy package nor a Hugging Face checkpoint (no config.json)"
        )
    _check_config_dims(pkg, path)
    model = TorchModel(str(path))
    check_same_model_shape(pkg, model.dims_dict, f"checkpoint {path}")
    desc = {"kind": "pytorch", "source": model.source, "weights_sha256": model.weights_sha256}
    return model, desc


def _check_config_dims(pkg: Package, path: Path) -> None:
    """Compare config.json with the package before loading any weights (fast, and torch-free)."""
    import json

    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(
            f"reference {path / 'config.json'} is not readable JSON ({e}); pass a valid checkpoint directory"
        ) from None
    if not isinstance(cfg, dict):
        raise UsageError(f"reference {path / 'config.json'} is not a model config; pass a valid checkpoint directory")
    n_embd = cfg.get("n_embd", cfg.get("hidden_size"))
    dims = {
        "vocab_size": cfg.get("vocab_size"),
        "n_layer": cfg.get("n_layer", cfg.get("num_hidden_layers")),
        "n_head": cfg.get("n_head", cfg.get("num_attention_heads")),
        "hidden_size": n_embd,
        "n_positions": cfg.get("n_positions", cfg.get("max_position_embeddings")),
    }
    check_same_model_shape(pkg, dims, f"checkpoint {path}")
