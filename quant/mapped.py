"""Save a graph so that ONNX Runtime memory-maps its weights and holds each of them once.

ONNX Runtime maps external initializers into memory (instead of reading them into its own buffers)
when their offset in the data file is page aligned. A weight that a kernel prepacks (``MatMulNBits``,
``DynamicQuantizeMatMul``, ...) is then read once from the mapping and released, leaving only the
prepacked copy; a weight read as-is stays a file mapping of which only the touched pages are resident.

The tied embedding/lm_head table is the exception: the lm_head prepacks it and the embedding
``Gather`` reads it raw, so the runtime would keep both the table and its prepacked copy. Here each
such ``Gather`` gets its own initializer, an alias whose external data points at the same bytes of the
same file: the prepacked weight is released, the alias stays mapped and only the looked-up rows are
ever read. The file holds the bytes once.
"""

from __future__ import annotations

import os
from pathlib import Path

from .graph import consumers

#: ops that replace a constant weight input by a prepacked copy: {op_type: weight input index}
PREPACKED_WEIGHT_INPUT = {
    "MatMulNBits": 1,
    "DynamicQuantizeMatMul": 1,
    "MatMulInteger": 1,
    "MatMulIntegerToFloat": 1,
    "QGemm": 3,
}
#: the offsets of large tensors are multiples of the page size (ONNX Runtime's default on-disk alignment)
ALIGNMENT = 4096
#: tensors smaller than this stay inside the graph file
MIN_EXTERNAL = 1024
#: tensors at least this large start on an ``ALIGNMENT`` boundary (smaller ones on 64 bytes)
ALIGN_FROM = 4096
ALIAS_SUFFIX = "_rows"


def alias_gathered_weights(model) -> list[dict]:
    """Point every ``Gather`` that reads a prepacked weight at an alias initializer; return the pairs.

    The alias has no data of its own until ``save_mapped`` writes it as the same external bytes; the
    returned list is ``[{"alias", "source", "gathers"}]``.
    """
    from onnx import TensorProto

    uses = consumers(model)
    inits = {t.name: t for t in model.graph.initializer}
    pairs = []
    for name, t in inits.items():
        users = uses.get(name, [])
        prepacked = [
            n
            for n in users
            if PREPACKED_WEIGHT_INPUT.get(n.op_type) is not None
            and len(n.input) > PREPACKED_WEIGHT_INPUT[n.op_type]
            and n.input[PREPACKED_WEIGHT_INPUT[n.op_type]] == name
        ]
        gathers = [n for n in users if n.op_type == "Gather" and n.input[0] == name]
        if not prepacked or not gathers or len(prepacked) + len(gathers) != len(users):
            continue
        alias_name = f"{name}{ALIAS_SUFFIX}"
        while alias_name in inits:
            alias_name += "_"
        alias = TensorProto(name=alias_name, data_type=t.data_type, dims=list(t.dims))
        for g in gathers:
            g.input[0] = alias.name
        pairs.append({"alias": alias, "source": name, "gathers": [g.name for g in gathers]})
    return pairs


def _tensor_bytes(t) -> bytes:
    from onnx import TensorProto, numpy_helper

    if t.data_location == TensorProto.EXTERNAL:
        raise ValueError(f"initializer {t.name} is external already; load the model with its data first")
    if t.HasField("raw_data"):
        return t.raw_data
    arr = numpy_helper.to_array(t)
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def _set_external(t, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto

    t.ClearField("raw_data")
    for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(f)
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v


def save_mapped(model, path: str | os.PathLike, alias: bool = True) -> list[Path]:
    """Write ``model`` as ``path`` + ``path.data`` laid out for memory mapping; return both paths.

    Tensors of at least ``MIN_EXTERNAL`` bytes go to the data file, the large ones at ``ALIGNMENT``-aligned
    offsets; with ``alias`` each Gather of a prepacked weight reads an alias of the same bytes (see the
    module docstring). ``model`` is modified: its tensors point at the data file afterwards.
    """
    import onnx

    path = Path(path)
    data = path.with_name(path.name + ".data")
    pairs = alias_gathered_weights(model) if alias else []
    where: dict[str, tuple[int, int]] = {}
    offset = 0
    with open(data, "wb") as f:
        for t in model.graph.initializer:
            raw = _tensor_bytes(t)
            if len(raw) < MIN_EXTERNAL and t.name not in {p["source"] for p in pairs}:
                continue
            pad = (-offset) % (ALIGNMENT if len(raw) >= ALIGN_FROM else 64)
            if pad:
                f.write(b"\0" * pad)
                offset += pad
            f.write(raw)
            _set_external(t, data.name, offset, len(raw))
            where[t.name] = (offset, len(raw))
            offset += len(raw)
        f.flush()
        os.fsync(f.fileno())
    for p in pairs:
        start, length = where[p["source"]]
        _set_external(p["alias"], data.name, start, length)
        model.graph.initializer.append(p["alias"])
    onnx.save_model(model, str(path))
    for p in (path, data):  # packages are read by other users and services
        os.chmod(p, 0o644)
    return [path, data]
