"""Locate, validate and load a Hugging Face GPT-2 checkpoint (local directory or hub id)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError

SUPPORTED_MODEL_TYPE = "gpt2"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Checkpoint:
    """A validated checkpoint directory."""

    source: str  # what the user passed (path or hub id)
    path: Path  # local directory holding config + weights
    config: dict
    weight_files: list[str] = field(default_factory=list)

    def weights_sha256(self) -> str:
        """sha256 over the weight files (a single file's plain sha256 when there is one)."""
        if len(self.weight_files) == 1:
            return _sha256(self.path / self.weight_files[0])
        h = hashlib.sha256()
        for name in self.weight_files:
            h.update(name.encode() + b"\0" + _sha256(self.path / name).encode())
        return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - comes with transformers
        raise CheckpointError(
            f"'{repo_id}' is not a local directory and huggingface_hub is not installed; pass a local checkpoint "
            "directory"
        ) from None
    base = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
    ]
    try:
        path = Path(
            snapshot_download(
                repo_id,
                allow_patterns=base + ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"],
                etag_timeout=10,
            )
        )
        if not any((path / n).is_file() for n in WEIGHT_FILES):  # older repos ship only pytorch_model.bin
            path = Path(
                snapshot_download(
                    repo_id,
                    allow_patterns=base + ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"],
                    etag_timeout=10,
                )
            )
        return path
    except Exception as e:  # offline, unknown repo, gated repo...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"'{repo_id}' is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {reason[:160]}); pass a local checkpoint directory (e.g. one saved with "
            "save_pretrained)"
        ) from None


def locate(model: str | os.PathLike) -> Checkpoint:
    """Resolve ``model`` to a checkpoint directory and validate its config and weight files."""
    source = str(model)
    path = Path(source).expanduser()
    if not path.exists():
        looks_local = (
            source.startswith((".", "/", "~"))
            or os.sep in source.strip("/").replace("/", "", 1)
            or source.count("/") > 1
        )
        if looks_local or not _HUB_ID.match(source):
            raise CheckpointError(
                f"model path {source} does not exist; pass a local GPT-2 checkpoint directory or a hub id like 'gpt2'"
            )
        path = _download(source)
    if not path.is_dir():
        raise CheckpointError(
            f"model path {source} is a file; pass the checkpoint directory that holds config.json and the weights"
        )
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{source} is not a Hugging Face checkpoint (no config.json); pass a directory saved with save_pretrained"
        )
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{cfg_path} is not valid JSON ({e}); re-save the checkpoint with save_pretrained"
        ) from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != SUPPORTED_MODEL_TYPE:
        raise CheckpointError(
            f"{source} is a '{model_type}' model; gpt2deploy supports model_type '{SUPPORTED_MODEL_TYPE}' "
            "(GPT2LMHeadModel: gpt2, distilgpt2, gpt2-medium/large/xl and their fine-tunes)"
        )
    check_config(config, cfg_path)
    archs = config.get("architectures") or ["GPT2LMHeadModel"]
    if "GPT2LMHeadModel" not in archs:
        raise CheckpointError(f"{source} has architectures {archs}; gpt2deploy exports GPT2LMHeadModel checkpoints")
    weights = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        raise CheckpointError(
            f"{source} has a config but no weights (model.safetensors or pytorch_model.bin); copy the weight files "
            "into it"
        )
    # Prefer safetensors; index files name their shards.
    first = weights[0]
    if first.endswith(".index.json"):
        try:
            index = json.loads((path / first).read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except Exception:
            raise CheckpointError(f"{path / first} is not a valid weight index; re-save the checkpoint") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{source} lacks weight shard {missing[0]}; copy all shards listed in {first}")
        files = shards
    else:
        files = [first]
    return Checkpoint(source=source, path=path, config=config, weight_files=files)


#: GPT2Config keys, their defaults (as transformers applies them) and the largest value accepted.
_CONFIG_DIMS = {
    "n_layer": (12, 1024),
    "n_head": (12, 1024),
    "n_embd": (768, 1 << 17),
    "n_positions": (1024, 1 << 20),
    "vocab_size": (50257, 1 << 22),
}


def check_config(config: dict, cfg_path: Path) -> None:
    """A config whose dims cannot describe a GPT-2 (zero, negative, n_head not dividing n_embd) is refused
    here, by name, rather than failing later as if the weights were damaged."""
    dims = {}
    for key, (default, hi) in _CONFIG_DIMS.items():
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
            raise CheckpointError(f"{cfg_path}: {key} is {value!r}, not an integer in 1..{hi}; fix config.json")
        dims[key] = value
    if dims["n_embd"] % dims["n_head"]:
        raise CheckpointError(
            f"{cfg_path}: n_head {dims['n_head']} does not divide n_embd {dims['n_embd']}; fix config.json"
        )


def load_model(ckpt: Checkpoint):
    """Load GPT2LMHeadModel in fp32, eval mode. Never runs remote code; .bin loads with weights_only."""
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        model = GPT2LMHeadModel.from_pretrained(
            ckpt.path,
            trust_remote_code=False,
            weights_only=True,
            dtype=torch.float32,
            use_safetensors=ckpt.weight_files[0].endswith(".safetensors"),
        )
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(
            f"could not load the weights of {ckpt.source} ({type(e).__name__}: {reason}); the weight files are "
            "truncated or corrupt, re-download or re-save them"
        ) from None
    return model.eval()


def load_tokenizer_files(ckpt: Checkpoint) -> list[str]:
    """Names of the tokenizer files present in the checkpoint."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
    return [n for n in names if (ckpt.path / n).is_file()]
