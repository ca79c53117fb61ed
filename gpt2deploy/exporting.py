"""`gpt2deploy export`: checkpoint -> package directory with the fp32 variant, proven equal to PyTorch."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import UsageError
from .fsutil import check_output_dir, staged_dir
from .manifest import (
    CONFIG_FILES,
    FORMAT,
    SCHEMA_VERSION,
    TOKENIZER_FILES,
    VARIANT_FILES,
    file_entry,
    io_contract,
    providers_for_graph,
    save_manifest,
    variant_entry,
)

Progress = Callable[[str], None]


@dataclass
class ExportResult:
    path: Path
    manifest: dict
    export_seconds: float
    parity_seconds: float


def _generation_defaults(ckpt_dir: Path, dims: dict) -> dict:
    gen = {}
    path = ckpt_dir / "generation_config.json"
    if path.is_file():
        try:
            gen = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            gen = {}
    keep = (
        "eos_token_id",
        "bos_token_id",
        "pad_token_id",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "max_new_tokens",
        "max_length",
    )
    out = {k: gen[k] for k in keep if k in gen and gen[k] is not None}
    out.setdefault("eos_token_id", dims["eos_token_id"])
    return out


#: Providers of the plain fp32 graph; the optimized one is CPU-only (``providers_for_graph``).
FP32_PROVIDERS = ["CPUExecutionProvider", "CUDAExecutionProvider"]


def export_package(
    model: str,
    out: str | Path,
    opset: int | None = None,
    force: bool = False,
    atol: float | None = None,
    progress: Progress = lambda msg: None,
    optimize: bool = True,
) -> ExportResult:
    """Export ``model`` to a package at ``out`` (written to a temp dir, renamed at the end).

    With ``optimize`` (the default) the fp32 graph is the CPU-optimized one: ONNX Runtime's fusions and
    one GroupQueryAttention per layer, which takes an in-place KV buffer (``kv_cache: "shared"``).
    ``optimize=False`` keeps the exporter's plain ONNX graph (any runtime, CUDA). Parity with PyTorch is
    proven on the graph that is written. Timings are returned, not recorded: the manifest stays
    deterministic.
    """
    import exporters

    opset = exporters.DEFAULT_OPSET if opset is None else opset
    exporters.check_opset(opset)
    if atol is not None and (isinstance(atol, bool) or not isinstance(atol, (int, float)) or not 0 < atol < 1e3):
        raise UsageError(f"--atol must be a finite number > 0 (got {atol}); the default is 1e-4")
    out = check_output_dir(out, force)
    ckpt = exporters.locate(model)
    progress(f"loading {ckpt.source}")
    torch_model = exporters.load_model(ckpt)
    _check_finite_weights(torch_model, ckpt.source)
    dims = exporters.model_dims(torch_model.config)
    with staged_dir(out) as tmp:
        progress(f"exporting {dims['n_layer']} layers x {dims['hidden_size']} hidden (opset {opset})")
        t0 = time.perf_counter()
        meta = exporters.export_onnx(torch_model, tmp / VARIANT_FILES["fp32"], opset=opset)
        fused, kv_cache = {}, "concat"
        if optimize:
            progress("optimizing the fp32 graph for CPU (fusions, GroupQueryAttention)")
            fused, kv_cache = _optimize_fp32(tmp / VARIANT_FILES["fp32"], dims, progress)
            meta["external_data"] = True  # the optimized graph always keeps its weights in model.onnx.data
        export_seconds = time.perf_counter() - t0
        for name in (*CONFIG_FILES, *TOKENIZER_FILES):
            src = ckpt.path / name
            if src.is_file():
                shutil.copyfile(src, tmp / name)
        if not (tmp / "tokenizer.json").is_file():
            _write_fast_tokenizer(ckpt.path, tmp)
        if not (tmp / "generation_config.json").is_file():
            (tmp / "generation_config.json").write_text(
                json.dumps(_generation_defaults(ckpt.path, dims), indent=2) + "\n"
            )
        progress("validating parity with PyTorch")
        t0 = time.perf_counter()
        kwargs = {} if atol is None else {"atol": atol}
        parity = exporters.validate(torch_model, tmp / VARIANT_FILES["fp32"], tmp / "tokenizer.json", **kwargs)
        parity_seconds = time.perf_counter() - t0
        fp32_files = [VARIANT_FILES["fp32"]]
        if meta["external_data"]:
            fp32_files.append(VARIANT_FILES["fp32"] + ".data")
        shared = [n for n in (*CONFIG_FILES, *TOKENIZER_FILES) if (tmp / n).is_file()]
        manifest = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "gpt2deploy_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {
                "model": ckpt.source,
                "weights_files": ckpt.weight_files,
                "weights_sha256": ckpt.weights_sha256(),
                "n_params": meta["n_params"],
            },
            "model": dims,
            "io": io_contract(
                dims["n_layer"], dims["n_head"], dims["head_dim"], dims["vocab_size"], tuple(meta["optional_inputs"])
            ),
            "generation": _generation_defaults(ckpt.path, dims),
            "files": {n: file_entry(tmp, n) for n in shared},
            "variants": {
                "fp32": variant_entry(
                    tmp,
                    "fp32",
                    fp32_files,
                    precision="fp32",
                    opset=opset,
                    recipe={"exporter": "torch.onnx.export(dynamo=True)", "optimize": optimize, "fused": fused},
                    providers=providers_for_graph(FP32_PROVIDERS, fused),
                    parity=parity,
                    kv_cache=kv_cache,
                )
            },
        }
        save_manifest(tmp, manifest)
    return ExportResult(out, manifest, export_seconds, parity_seconds)


def _check_finite_weights(torch_model, source: str) -> None:
    """NaN or Inf in the weights makes every output NaN: refuse the checkpoint, naming the tensor."""
    import torch

    for name, param in torch_model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise UsageError(
                f"checkpoint {source} has NaN or Inf values in {name}; it is corrupt or diverged in training, "
                "export a checkpoint with finite weights"
            )


def _optimize_fp32(path: Path, dims: dict, progress: Progress) -> tuple[dict, str]:
    """Rewrite the exported graph at ``path`` with ``quant.optimize``; returns (fused ops, kv_cache).

    The weights go to ``model.onnx.data`` at page-aligned offsets (``quant.mapped``), so ONNX Runtime maps them
    instead of parsing the whole protobuf and copying every tensor out of it (a lower peak RSS while loading).
    """
    import quant.graph as qgraph
    from quant.errors import QuantError
    from quant.mapped import save_mapped
    from quant.optimize import optimize

    from .errors import PackageError

    try:
        model, report = optimize(qgraph.load(path), dims["n_head"], dims["hidden_size"], progress=progress)
    except QuantError as e:
        raise PackageError(
            f"optimizing the exported graph failed ({e}); export with --portable to keep the plain graph"
        ) from None
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    save_mapped(model, path)
    return report.fused, report.kv_cache


def _write_fast_tokenizer(ckpt_dir: Path, out: Path) -> None:
    """Checkpoints with only vocab.json/merges.txt get a tokenizer.json for the runtime."""
    from .errors import PackageError

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ckpt_dir, trust_remote_code=False)
        tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    except Exception as e:
        raise PackageError(
            f"{ckpt_dir} has no usable tokenizer ({type(e).__name__}); add tokenizer.json or vocab.json + merges.txt"
        ) from None
