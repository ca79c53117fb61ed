"""Small graph helpers shared by the passes: loading, initializer lookup, decoder contract, saving."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Union

from .errors import QuantError

if TYPE_CHECKING:  # onnx is imported lazily at run time
    import onnx

#: Serialized protobufs are limited to 2 GiB; above this the weights go to an external ``.data`` file.
PROTOBUF_LIMIT = 2_000_000_000

ModelLike = Union["onnx.ModelProto", str, os.PathLike]

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")


def load(model: ModelLike):
    """A ModelProto from a path (external data included) or the ModelProto itself."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise QuantError(f"ONNX graph {path} does not exist; pass the path of a decoder graph")
    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as e:  # protobuf DecodeError, missing .data file...
        raise QuantError(f"cannot read ONNX graph {path} ({type(e).__name__}); re-export the model") from None


def initializers(model) -> dict:
    return {t.name: t for t in model.graph.initializer}


def producers(model) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def consumers(model) -> dict:
    out: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def opset(model, domain: str = "") -> int:
    for o in model.opset_import:
        if o.domain in (domain, "ai.onnx" if domain == "" else domain):
            return o.version
    return 0


def ensure_opset(model, domain: str, version: int) -> None:
    for o in model.opset_import:
        if o.domain == domain:
            o.version = max(o.version, version)
            return
    model.opset_import.add(domain=domain, version=version)


def check_decoder(model, n_layer: int | None = None) -> int:
    """Check the graph follows the decoder contract (Optimum names); return its layer count.

    Inputs ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value``;
    outputs ``logits``, ``present.{i}.key|value`` for every layer ``i``.
    """
    ins = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    outs = [o.name for o in model.graph.output]
    fix = "pass a decoder exported by 'gpt2deploy export' (Optimum I/O names)"
    missing = [n for n in ("input_ids", "attention_mask", "position_ids") if n not in ins]
    if missing or "logits" not in outs:
        what = ", ".join(missing + ([] if "logits" in outs else ["logits"]))
        raise QuantError(f"the graph is not a KV-cache decoder (missing {what}); {fix}")
    past = sorted({int(m.group(1)) for m in map(_PAST.match, ins) if m})
    present = sorted({int(m.group(1)) for m in map(_PRESENT.match, outs) if m})
    layers = n_layer if n_layer is not None else len(past)
    want = list(range(layers))
    if layers == 0 or past != want or present != want:
        raise QuantError(
            f"the graph's past/present tensors do not cover layers 0..{layers - 1} "
            f"(past layers {past[:4]}{'...' if len(past) > 4 else ''}, present layers "
            f"{present[:4]}{'...' if len(present) > 4 else ''}); {fix}"
        )
    for i in want:
        for kind in ("key", "value"):
            if f"past_key_values.{i}.{kind}" not in ins or f"present.{i}.{kind}" not in outs:
                raise QuantError(f"the graph lacks past_key_values.{i}.{kind} or present.{i}.{kind}; {fix}")
    extra = [n for n in ins if n not in ("input_ids", "attention_mask", "position_ids") and not _PAST.match(n)]
    if extra:
        raise QuantError(f"the graph has unexpected inputs ({', '.join(extra[:3])}); {fix}")
    return layers


def proto_size(model) -> int:
    """Bytes of all initializer data (inline or external) plus the rest of the graph, roughly."""
    return (
        sum(tensor_bytes(t) for t in model.graph.initializer)
        + model.graph.ByteSize()
        - sum(len(t.raw_data) for t in model.graph.initializer)
    )


def tensor_bytes(t) -> int:
    """Bytes of a tensor's data whether it is held as raw_data, typed fields or external data."""
    import onnx

    n = 1
    for d in t.dims:
        n *= d
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (n + 1) // 2
    return n * dtype.itemsize


def save(model, path: str | os.PathLike, external: bool | None = None) -> list[Path]:
    """Save ``model`` to ``path``; weights go to ``<name>.data`` beside it when the graph exceeds 2 GB.

    Returns the files written (graph first).
    """
    import onnx

    path = Path(path)
    if external is None:
        external = proto_size(model) > PROTOBUF_LIMIT
    if external:
        data = path.with_name(path.name + ".data")
        if data.exists():
            data.unlink()
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
        written = [path, data]
    else:
        onnx.save_model(model, str(path))
        written = [path]
    for p in written:  # onnx creates the data file owner-only; packages are read by other users and services
        os.chmod(p, 0o644)
    return written
