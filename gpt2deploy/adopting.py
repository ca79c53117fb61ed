"""`gpt2deploy adopt DIR -o PKG`: an ONNX folder exported by Hugging Face Optimum -> a gpt2deploy package.

Optimum's ``optimum-cli export onnx --task text-generation-with-past`` (or ``main_export``) writes
``model.onnx`` (weights inside it or in ``model.onnx_data``), ``config.json``, ``generation_config.json`` and
the tokenizer. That graph follows the contract gpt2deploy's runtime drives (input_ids, attention_mask,
position_ids, past_key_values.{i}.key|value -> logits, present.{i}.key|value, KV [batch, heads, seq, head_dim]),
so adopting it is: check the folder (architecture, with-past, dims, tokenizer, external data), run the graph
once, optionally prove parity with the PyTorch checkpoint, copy and hash it into a package as its fp32 variant.
The package then quantizes, checks and runs like any other. Nothing is written unless every check passes.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from . import __version__
from .errors import RegressionError, UsageError
from .fsutil import check_output_dir, staged_dir
from .manifest import (
    CONFIG_FILES,
    FORMAT,
    SCHEMA_VERSION,
    TOKENIZER_FILES,
    VARIANT_FILES,
    file_entry,
    io_contract,
    save_manifest,
)

Progress = Callable[[str], None]
GRAPH = "model.onnx"
REEXPORT = "re-export it with 'optimum-cli export onnx --model MODEL --task text-generation-with-past DIR'"
#: Bounds for what is read from an untrusted folder before anything heavier happens.
MAX_CONFIG_BYTES = 1 << 20
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"present\.(\d+)\.(key|value)$")


def _read_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise UsageError(f"{src} has no config.json; adopt takes the whole folder Optimum wrote ({REEXPORT})")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UsageError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes; pass the config.json Optimum wrote")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e}); pass the config.json Optimum wrote") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path} is not a JSON object; pass the config.json Optimum wrote")
    kind = config.get("model_type")
    if kind != "gpt2":
        raise UsageError(
            f"{src} holds a {kind or 'model of unknown type'} export, not GPT-2; adopt takes GPT-2 exports only"
        )
    return config


def _dims(config: dict, src: Path) -> dict:
    keys = ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions")
    bad = [k for k in keys if not isinstance(config.get(k), int) or isinstance(config.get(k), bool) or config[k] < 1]
    if bad:
        raise UsageError(f"{src}/config.json lacks a positive integer {bad[0]}; pass the config.json Optimum wrote")
    if config["n_embd"] % config["n_head"]:
        raise UsageError(f"{src}/config.json: n_embd {config['n_embd']} is not a multiple of n_head {config['n_head']}")
    eos = config.get("eos_token_id")
    bos = config.get("bos_token_id")
    return {
        "model_type": "gpt2",
        "n_layer": config["n_layer"],
        "n_head": config["n_head"],
        "head_dim": config["n_embd"] // config["n_head"],
        "hidden_size": config["n_embd"],
        "vocab_size": config["vocab_size"],
        "n_positions": config["n_positions"],
        "bos_token_id": bos if isinstance(bos, int) else None,
        "eos_token_id": eos if isinstance(eos, int) else None,
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", True)),
    }


def _external_files(model, src: Path) -> list[str]:
    """The external data files the graph names (relative to ``src``), each checked to exist inside it."""
    from onnx.external_data_helper import uses_external_data

    names = []
    for t in model.graph.initializer:
        if not uses_external_data(t):
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        p = PurePosixPath(loc.replace("\\", "/"))
        if not loc or p.is_absolute() or ".." in p.parts or len(p.parts) != 1:
            raise UsageError(f"{src}/{GRAPH} names external data {loc!r} outside its folder; {REEXPORT}")
        if loc not in names:
            names.append(loc)
    for name in names:
        if not (src / name).is_file():
            raise UsageError(
                f"{src}/{GRAPH} keeps its weights in {name}, which is missing; copy {name} beside it or {REEXPORT}"
            )
    return names


def _shape(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]


def _check_io(model, dims: dict, src: Path) -> None:
    from onnx import TensorProto

    inits = {t.name for t in model.graph.initializer}
    ins = {i.name: i for i in model.graph.input if i.name not in inits}
    outs = {o.name: o for o in model.graph.output}
    past = {m.groups() for m in map(_PAST.match, ins) if m}
    if not past:
        raise UsageError(
            f"{src}/{GRAPH} has no past_key_values inputs: it was exported without the KV cache; "
            "re-export it with '--task text-generation-with-past'"
        )
    for name in ("input_ids", "attention_mask", "position_ids"):
        if name not in ins:
            raise UsageError(f"{src}/{GRAPH} lacks the input {name} of the decoder contract; {REEXPORT}")
        if ins[name].type.tensor_type.elem_type != TensorProto.INT64:
            raise UsageError(f"{src}/{GRAPH}: input {name} is not int64; {REEXPORT}")
    n, h, d = dims["n_layer"], dims["n_head"], dims["head_dim"]
    want = {(str(i), k) for i in range(n) for k in ("key", "value")}
    if past != want:
        raise UsageError(
            f"{src}/{GRAPH} has {len(past)} past tensors but config.json says {n} layers ({2 * n} tensors); "
            "the graph and config.json come from different models"
        )
    extra = [x for x in ins if x not in ("input_ids", "attention_mask", "position_ids") and not _PAST.match(x)]
    if extra:
        raise UsageError(f"{src}/{GRAPH} has inputs outside the decoder contract ({', '.join(extra[:3])}); {REEXPORT}")
    if "logits" not in outs:
        raise UsageError(f"{src}/{GRAPH} has no logits output; {REEXPORT}")
    for i in range(n):
        for k in ("key", "value"):
            vi = ins[f"past_key_values.{i}.{k}"]
            if f"present.{i}.{k}" not in outs:
                raise UsageError(f"{src}/{GRAPH} lacks the output present.{i}.{k}; {REEXPORT}")
            shape = _shape(vi)
            if vi.type.tensor_type.elem_type != TensorProto.FLOAT or len(shape) != 4:
                raise UsageError(f"{src}/{GRAPH}: past_key_values.{i}.{k} is not float32 of rank 4; {REEXPORT}")
            for axis, size in ((1, h), (3, d)):
                if isinstance(shape[axis], int) and shape[axis] != size:
                    raise UsageError(
                        f"{src}/{GRAPH}: past_key_values.{i}.{k} is {shape} but config.json gives {h} heads of {d}; "
                        "the graph and config.json come from different models"
                    )
    vocab = _shape(outs["logits"])[-1:] or ["?"]
    if isinstance(vocab[0], int) and vocab[0] != dims["vocab_size"]:
        raise UsageError(
            f"{src}/{GRAPH}: logits have {vocab[0]} entries but config.json says vocab_size {dims['vocab_size']}; "
            "the graph and config.json come from different models"
        )


def _check_tokenizer(src: Path, dims: dict) -> None:
    path = src / "tokenizer.json"
    if not path.is_file():
        raise UsageError(
            f"{src} has no tokenizer.json; copy the model's tokenizer.json beside {GRAPH} "
            "(Optimum writes it when the model has a fast tokenizer)"
        )
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise UsageError(
            f"{path} cannot be read ({(str(e).splitlines() or [type(e).__name__])[0][:100]}); "
            "copy the model's tokenizer.json"
        ) from None
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > dims["vocab_size"]:
        raise UsageError(
            f"{path} has {size} tokens but the model's vocabulary has {dims['vocab_size']}: the tokenizer belongs to "
            "another model; copy the tokenizer.json of the exported model"
        )
    eos = dims.get("eos_token_id")
    if eos is not None and eos >= size:
        raise UsageError(
            f"config.json's eos_token_id {eos} is not a token of {path} ({size} tokens); "
            "copy the tokenizer.json of the exported model"
        )


def _smoke_run(graph: Path, dims: dict) -> None:
    """Prompt step + one decode step on the CPU; finite logits of the right shape, present = past + new."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UsageError(f"ONNX Runtime cannot load {graph.name} ({first}); {REEXPORT}") from None
    n, h, d = dims["n_layer"], dims["n_head"], dims["head_dim"]
    past = {f"past_key_values.{i}.{k}": np.zeros((1, h, 0, d), np.float32) for i in range(n) for k in ("key", "value")}
    ids = np.array([[min(464, dims["vocab_size"] - 1), 1, 2]], np.int64)
    for _ in range(2):
        s = ids.shape[1]
        plen = past["past_key_values.0.key"].shape[2]
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((1, plen + s), np.int64),
            "position_ids": np.arange(plen, plen + s, dtype=np.int64)[None],
            **past,
        }
        names = ["logits"] + [f"present.{i}.{k}" for i in range(n) for k in ("key", "value")]
        out = sess.run(names, feed)
        logits = out[0]
        if logits.shape != (1, s, dims["vocab_size"]) or not np.isfinite(logits).all():
            raise UsageError(
                f"{graph.name} gives logits {logits.shape} (all finite: {bool(np.isfinite(logits).all())}); {REEXPORT}"
            )
        if out[1].shape != (1, h, plen + s, d):
            raise UsageError(f"{graph.name} returns present {out[1].shape}, not past + new positions; {REEXPORT}")
        past = dict(zip([k.replace("present.", "past_key_values.") for k in names[1:]], out[1:], strict=True))
        ids = logits[:, -1:].argmax(-1).astype(np.int64)


def adopt_folder(
    src: str | Path,
    out: str | Path,
    reference: str | Path | None = None,
    force: bool = False,
    progress: Progress = lambda msg: None,
) -> dict:
    """Check the Optimum folder ``src`` and write it to ``out`` as a package with an fp32 variant; returns the manifest.

    ``reference`` (a local PyTorch GPT-2 checkpoint directory) adds a parity proof, as ``export`` records one.
    """
    src = Path(src).expanduser()
    if not src.is_dir():
        raise UsageError(f"{src} is not a directory; pass the folder Optimum exported to")
    graph = src / GRAPH
    if not graph.is_file():
        others = sorted(p.name for p in src.glob("*.onnx"))
        hint = f" (it has {', '.join(others[:3])})" if others else ""
        raise UsageError(f"{src} has no {GRAPH}{hint}; {REEXPORT}")
    config = _read_config(src)
    dims = _dims(config, src)
    import onnx

    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise UsageError(f"{graph} is not an ONNX graph ({type(e).__name__}); {REEXPORT}") from None
    data_files = _external_files(model, src)
    _check_io(model, dims, src)
    _check_tokenizer(src, dims)
    out = check_output_dir(out, force)
    if src.resolve() == out.resolve() or out.resolve() in src.resolve().parents:
        raise UsageError(f"output {out} would replace the folder {src}; choose an output directory outside it")
    progress(f"checked {src}: GPT-2, {dims['n_layer']} layers x {dims['hidden_size']} hidden, with past")
    from quant.graph import opset as graph_opset
    from quant.requirements import requirement

    opset = graph_opset(model)
    requires = {"onnxruntime": requirement(model)["onnxruntime"]}
    fused = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            fused[node.op_type] = fused.get(node.op_type, 0) + 1
    del model
    with staged_dir(out) as tmp:
        dest = tmp / VARIANT_FILES["fp32"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(graph, dest)
        for name in data_files:
            shutil.copyfile(src / name, dest.parent / name)
        for name in (*CONFIG_FILES, *TOKENIZER_FILES):
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        if not (tmp / "generation_config.json").is_file():
            eos = {"eos_token_id": dims["eos_token_id"]} if dims["eos_token_id"] is not None else {}
            (tmp / "generation_config.json").write_text(json.dumps(eos, indent=2) + "\n")
        progress("running the graph once (prompt + one decode step)")
        _smoke_run(dest, dims)
        parity = None
        if reference is not None:
            parity = _parity(reference, dims, dest, tmp / "tokenizer.json", progress)
        files = [VARIANT_FILES["fp32"], *(str(PurePosixPath(VARIANT_FILES["fp32"]).parent / n) for n in data_files)]
        shared = [n for n in (*CONFIG_FILES, *TOKENIZER_FILES) if (tmp / n).is_file()]
        from .exporting import _generation_defaults
        from .manifest import providers_for_graph, variant_entry

        entry = variant_entry(
            tmp,
            "fp32",
            files,
            precision="fp32",
            opset=opset,
            recipe={"exporter": "optimum", "adopted_from": str(src), "optimize": False, "fused": fused},
            providers=providers_for_graph(["CPUExecutionProvider", "CUDAExecutionProvider"], fused),
            kv_cache="concat",
            requires=requires,
            **({"parity": parity} if parity else {}),
        )
        manifest = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "gpt2deploy_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"model": str(src), "exporter": "optimum", "reference": str(reference) if reference else None},
            "model": dims,
            "io": io_contract(dims["n_layer"], dims["n_head"], dims["head_dim"], dims["vocab_size"]),
            "generation": _generation_defaults(src, dims),
            "files": {n: file_entry(tmp, n) for n in shared},
            "variants": {"fp32": entry},
        }
        save_manifest(tmp, manifest)
    return manifest


def _parity(reference, dims: dict, graph: Path, tokenizer: Path, progress: Progress) -> dict:
    """Prove the adopted graph equals the PyTorch checkpoint ``reference`` (exporters.validate)."""
    import exporters

    ref = Path(reference).expanduser()
    if not ref.is_dir():
        raise UsageError(f"--reference {ref} is not a directory; pass the local PyTorch checkpoint of the export")
    ckpt = exporters.locate(str(ref))
    torch_model = exporters.load_model(ckpt)
    theirs = exporters.model_dims(torch_model.config)
    for k in ("n_layer", "n_head", "hidden_size", "vocab_size"):
        if theirs[k] != dims[k]:
            raise UsageError(
                f"--reference {ref} has {k} {theirs[k]} but the export has {dims[k]}; pass the checkpoint it came from"
            )
    progress(f"validating parity with {ref}")
    try:
        return exporters.validate(torch_model, graph, tokenizer)
    except exporters.ParityError as e:
        raise RegressionError(
            f"the adopted graph does not match --reference {ref}: {str(e).split(';')[0]}; nothing was written"
        ) from None
