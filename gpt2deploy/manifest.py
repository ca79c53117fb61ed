"""The package manifest: schema, I/O contract, file entries.

A package is a directory::

    manifest.json           this schema (``schema_version``)
    config.json, generation_config.json, tokenizer files
    onnx/model.onnx         fp32 variant (+ model.onnx.data: its weights; inside the graph for --portable < 2 GB)
    onnx/model_int8.onnx    int8 variant, onnx/model_q4.onnx int4, onnx/model_fp16.onnx fp16 (each + NAME.onnx.data)

The runtime reads dims and graph I/O names from here; it never imports exporter code.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__
from .errors import PackageError
from .fsutil import sha256_file, write_json_atomic
from .schema import KV_CACHE_MODES  # noqa: F401  (re-exported)

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20  # real manifests are tens of kB
FORMAT = "gpt2deploy-package"

#: Variant name -> graph file, following transformers.js naming.
VARIANT_FILES = {
    "fp32": "onnx/model.onnx",
    "int8": "onnx/model_int8.onnx",
    "int4": "onnx/model_q4.onnx",
    "fp16": "onnx/model_fp16.onnx",
}

#: A variant's ``kv_cache``: "concat" (absent means this too) takes past [batch, heads, P, head_dim] and
#: returns present [batch, heads, P + S, head_dim], the plain contract. "shared" graphs follow that
#: contract too and also accept one buffer [batch, heads, capacity, head_dim] bound as both past and
#: present: the valid length is the attention_mask width, and the new keys/values are written in place.
#: (defined with the validator in ``schema``)


def providers_for_graph(providers: list[str], fused: dict) -> list[str]:
    """``providers`` a graph is built for, less CUDA when it holds GroupQueryAttention (``fused``: op counts).

    The fused GroupQueryAttention takes the padding mask as a bias, which ONNX Runtime's CUDA kernel rejects.
    """
    if not fused.get("GroupQueryAttention"):
        return list(providers)
    return [p for p in providers if p != "CUDAExecutionProvider"] or ["CPUExecutionProvider"]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
CONFIG_FILES = ("config.json", "generation_config.json")

BATCH, SEQ, PAST = "batch_size", "sequence_length", "past_sequence_length"
TOTAL = "past_sequence_length + sequence_length"


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


#: Optional graph inputs (initializers listed as inputs: ONNX's defaults) the runtime may feed.
#: ``logits_to_keep`` int64 [1]: logits for the last N positions only (0, the default: all of them).
LOGITS_TO_KEEP = "logits_to_keep"
OPTIONAL_INPUTS = {LOGITS_TO_KEEP: {"name": LOGITS_TO_KEEP, "dtype": "int64", "shape": [1], "default": [0]}}


def io_contract(n_layer: int, n_head: int, head_dim: int, vocab_size: int, optional: tuple[str, ...] = ()) -> dict:
    """The graph I/O contract (Hugging Face Optimum names), KV layout [batch, heads, seq, head_dim].

    ``optional`` names inputs of ``OPTIONAL_INPUTS`` the graph also takes (recorded as ``optional_inputs``).
    """
    inputs = [
        {"name": "input_ids", "dtype": "int64", "shape": [BATCH, SEQ]},
        {"name": "attention_mask", "dtype": "int64", "shape": [BATCH, TOTAL]},
        {"name": "position_ids", "dtype": "int64", "shape": [BATCH, SEQ]},
    ]
    outputs = [{"name": "logits", "dtype": "float32", "shape": [BATCH, SEQ, vocab_size]}]
    for i in range(n_layer):
        for kind in ("key", "value"):
            inputs.append({"name": past_name(i, kind), "dtype": "float32", "shape": [BATCH, n_head, PAST, head_dim]})
            outputs.append(
                {"name": present_name(i, kind), "dtype": "float32", "shape": [BATCH, n_head, TOTAL, head_dim]}
            )
    contract = {"inputs": inputs, "outputs": outputs, "kv_layout": "batch,heads,sequence,head_dim"}
    if optional:
        contract["optional_inputs"] = [dict(OPTIONAL_INPUTS[n]) for n in optional]
    return contract


def optional_input_names(contract: dict) -> set[str]:
    """Names of the optional inputs an I/O contract lists (none for packages written before they existed)."""
    return {t.get("name") for t in contract.get("optional_inputs") or [] if isinstance(t, dict)}


def file_entry(root: str | Path, rel: str) -> dict:
    p = Path(root) / rel
    return {"path": rel, "sha256": sha256_file(p), "size": p.stat().st_size}


def variant_entry(
    root: Path, name: str, files: list[str], precision: str, opset: int, recipe: dict, providers: list[str], **extra
) -> dict:
    """A manifest variant entry with file hashes computed from disk and the runtime its graph needs."""
    from .compat import graph_ragged_rows, graph_requires
    from .versions import library_versions

    entries = [file_entry(root, f) for f in files]
    extra.setdefault("requires", graph_requires(Path(root) / files[0]))
    if extra.get("kv_cache") == "shared" and graph_ragged_rows(Path(root) / files[0]):
        extra.setdefault("ragged_rows", True)
    return {
        "file": files[0],
        "files": entries,
        "size": sum(e["size"] for e in entries),
        "precision": precision,
        "opset": opset,
        "recipe": recipe,
        "providers": providers,
        "libraries": library_versions(),
        **extra,
    }


def load_manifest(root: str | Path) -> dict:
    root = Path(root)
    if not root.exists():
        raise PackageError(f"package {root} does not exist; pass a directory written by 'gpt2deploy export' or 'build'")
    if not root.is_dir():
        raise PackageError(f"package path {root} is a file; pass the package directory")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise PackageError(
            f"{root} is not a gpt2deploy package (no {MANIFEST_NAME}); create one with 'gpt2deploy export MODEL -o "
            f"{root}'"
        )
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise PackageError(f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; re-create the package")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackageError(
            f"{path} is not valid JSON ({e}); re-create the package with 'gpt2deploy export' or 'build'"
        ) from None
    except RecursionError:
        raise PackageError(f"{path} is nested too deeply; re-create the package") from None
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise PackageError(
            f"{path} holds text that is not valid Unicode (an escaped lone surrogate); re-create the package"
        ) from None
    except (ValueError, RecursionError):
        raise PackageError(f"{path} is nested too deeply; re-create the package") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PackageError(
            f"{path} is not a gpt2deploy manifest; re-create the package with 'gpt2deploy export' or 'build'"
        )
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise PackageError(
                f"{path} has schema_version {version}, newer than this gpt2deploy ({__version__}) reads "
                f"(schema {SCHEMA_VERSION}); upgrade gpt2deploy"
            )
        raise PackageError(
            f"{path} has unknown schema_version {version!r} (this gpt2deploy reads {SCHEMA_VERSION}); "
            "re-create the package with 'gpt2deploy build'"
        )
    for key in ("model", "io", "variants", "files"):
        if not isinstance(data.get(key), dict):
            raise PackageError(f"{path} lacks the '{key}' section; re-create the package with 'gpt2deploy build'")
    return data


def save_manifest(root: str | Path, manifest: dict) -> None:
    write_json_atomic(Path(root) / MANIFEST_NAME, manifest)
