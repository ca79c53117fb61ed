"""`gpt2deploy triton`: one package variant -> a Triton Inference Server model (ONNX Runtime backend).

Layout written inside the model repository ``REPO``::

    REPO/<name>/config.pbtxt          platform "onnxruntime_onnx", inputs/outputs from the manifest
    REPO/<name>/1/model.onnx          the variant's graph (+ its external data file, original name kept)
    REPO/<name>/1/manifest.json       the package manifest, tokenizer and generation files, for clients

``max_batch_size`` is 0 and every dimension is spelled out (-1 where dynamic), batch included: the batch
axis lives inside the past/present KV tensors whose sequence lengths differ from request to request, so
Triton's dynamic batcher could not concatenate two requests anyway. Clients run the decode loop: send
``input_ids``/``attention_mask``/``position_ids`` plus the ``past_key_values.*`` returned as ``present.*`` by
the previous step (empty, sequence length 0, on the first step), batched on their side with left padding.

Only ``REPO/<name>`` is written (staged, renamed in place), so other models in the repository are untouched.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from . import __version__
from .errors import UsageError
from .fsutil import check_output_dir, sha256_file, staged_dir
from .manifest import CONFIG_FILES, MANIFEST_NAME, TOKENIZER_FILES
from .package import Package

Progress = Callable[[str], None]

#: Manifest dtype -> Triton data type.
TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}
KINDS = {"cpu": "KIND_CPU", "cuda": "KIND_GPU"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class TritonResult:
    model_dir: Path
    name: str
    variant: str
    config: str  # the config.pbtxt text
    files: list[str]  # paths written, relative to model_dir


def default_name(manifest: dict, variant: str) -> str:
    source = str(manifest.get("source", {}).get("model") or "gpt2").rstrip("/\\")
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", PurePosixPath(source.replace("\\", "/")).name).strip("-.") or "gpt2"
    return f"{base}_{variant}"


def _pick_variant(pkg: Package, variant: str | None, device: str) -> str:
    if variant is not None:
        pkg.variant(variant)  # VariantError listing the present ones
        return variant
    try:
        from .runtime.select import select_variant
    except ImportError:
        return "fp32" if "fp32" in pkg.variants else sorted(pkg.variants)[0]
    return select_variant(pkg.manifest, device)[0]


def config_pbtxt(
    name: str, contract: dict, device: str = "cpu", instances: int = 1, threads: int | None = None, note: str = ""
) -> str:
    """The Triton model configuration (protobuf text format) for a graph with this I/O contract."""

    def tensor(t: dict) -> str:
        if t["dtype"] not in TRITON_TYPES:
            raise UsageError(
                f"tensor {t['name']} has dtype {t['dtype']}, which Triton cannot serve; choose another variant"
            )
        dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in t["shape"])
        return f'  {{\n    name: "{t["name"]}"\n    data_type: {TRITON_TYPES[t["dtype"]]}\n    dims: [ {dims} ]\n  }}'

    parts = [f"# {note}\n" if note else ""]
    parts.append(f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n')
    parts.append("input [\n" + ",\n".join(tensor(t) for t in contract["inputs"]) + "\n]\n")
    parts.append("output [\n" + ",\n".join(tensor(t) for t in contract["outputs"]) + "\n]\n")
    parts.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: {KINDS[device]}\n  }}\n]\n")
    if threads:
        parts.append(f'parameters {{\n  key: "intra_op_thread_count"\n  value: {{ string_value: "{threads}" }}\n}}\n')
    return "".join(parts)


def export_triton(
    package: str | os.PathLike,
    repo: str | os.PathLike,
    variant: str | None = None,
    name: str | None = None,
    device: str = "cpu",
    instances: int = 1,
    threads: int | None = None,
    force: bool = False,
    progress: Progress = lambda msg: None,
) -> TritonResult:
    """Write ``repo/<name>`` for one variant of ``package`` (integrity-checked first)."""
    if device not in KINDS:
        raise UsageError(f"unknown device '{device}' for Triton; choose one of {', '.join(KINDS)}")
    if instances < 1:
        raise UsageError(f"--instances must be >= 1 (got {instances})")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1 (got {threads})")
    pkg = Package.open(package)
    variant = _pick_variant(pkg, variant, device)
    name = name or default_name(pkg.manifest, variant)
    if not _NAME.match(name):
        raise UsageError(
            f"model name '{name}' is not a valid Triton model directory name; use letters, digits, '_', '-', '.'"
        )
    repo = Path(repo).absolute()
    if repo.exists() and not repo.is_dir():
        raise UsageError(f"Triton repository path {repo} is a file; pass a directory")
    if repo.resolve() == pkg.root.resolve() or pkg.root.resolve() in (repo / name).resolve().parents:
        raise UsageError(
            f"the Triton repository {repo} must be outside the package {pkg.root}; choose another directory"
        )
    out = check_output_dir(repo / name, force)
    progress(f"checking {variant} files")
    pkg.check_integrity([variant])
    entry = pkg.variant(variant)
    contract = entry.get("io") or pkg.manifest["io"]
    note = (
        f"gpt2deploy {__version__}: variant {variant} of {pkg.manifest.get('source', {}).get('model', pkg.root.name)}"
    )
    config = config_pbtxt(name, contract, device=device, instances=instances, threads=threads, note=note)
    written = []
    with staged_dir(out) as tmp:
        version = tmp / "1"
        version.mkdir()
        for f in entry["files"]:
            src = pkg.root / f["path"]
            dst = version / ("model.onnx" if f["path"] == entry["file"] else PurePosixPath(f["path"]).name)
            progress(f"copying {f['path']} -> {dst.relative_to(tmp)}")
            shutil.copyfile(src, dst)
            if sha256_file(dst) != f["sha256"]:  # the source changed while copying
                raise UsageError(f"{f['path']} changed while it was copied; re-run the command")
            written.append(dst.relative_to(tmp).as_posix())
        for n in (*CONFIG_FILES, *TOKENIZER_FILES, MANIFEST_NAME):
            if (pkg.root / n).is_file():
                shutil.copyfile(pkg.root / n, version / n)
                written.append(f"1/{n}")
        (tmp / "config.pbtxt").write_text(config, encoding="utf-8")
        written.insert(0, "config.pbtxt")
    progress(f"wrote model '{name}' ({variant}) to {repo}")
    return TritonResult(out, name, variant, config, written)
