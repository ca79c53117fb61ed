"""`gpt2deploy verify`: is this package exactly what its manifest says?

Checks, each reported as one line naming the file: the manifest parses and its schema version is known;
every listed file is present with its recorded size and sha256 (the same check ``load()`` runs, via
:meth:`Package.integrity_problems`); no symlink points outside the package; no ONNX graph or external-data
file sits in the package unlisted; each graph's inputs and outputs (names, dtypes, shapes) match the
manifest's I/O contract and its external data files are listed.

Graphs are read with ``onnx`` (without loading weights) when it is installed, otherwise through an
ONNX Runtime session, so verify works with the runtime install alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import PackageError
from .manifest import MANIFEST_NAME, load_manifest
from .package import Package
from .schema import SchemaError, parse_manifest

GRAPH_SUFFIXES = (".onnx", ".onnx.data", ".onnx_data")

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


@dataclass
class VerifyReport:
    root: Path
    problems: list[str] = field(default_factory=list)
    variants: list[str] = field(default_factory=list)
    files_checked: int = 0
    graphs_checked: int = 0
    graph_reader: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class GraphIO:
    inputs: dict  # name -> (dtype, shape or None)
    outputs: dict
    external: list[str] | None  # external data locations, relative to the graph (None: not inspected)
    optional: dict = field(default_factory=dict)  # inputs with a default (initializers listed as inputs)
    positions: int | None = None  # rows of the position embedding table (None: not inspected)


def verify_package(
    path: str | os.PathLike, hashes: bool = True, graphs: bool = True, reader: str = "auto"
) -> VerifyReport:
    """Verify a package. Raises :class:`PackageError` only when ``path`` is not a package directory at all."""
    root = Path(path).absolute()
    report = VerifyReport(root)
    try:
        manifest = load_manifest(root)
    except PackageError as e:
        if root.is_dir() and (root / MANIFEST_NAME).is_file():
            report.problems.append(f"{MANIFEST_NAME}: {e}")
            return report
        raise
    manifest_real = (root / MANIFEST_NAME).resolve()
    if manifest_real.parent != root.resolve():
        report.problems.append(
            f"{MANIFEST_NAME}: symlink points outside the package ({manifest_real}); packages must be self-contained"
        )
    try:
        spec = parse_manifest(manifest, root, collect=True)
    except SchemaError as e:
        report.problems.append(f"{MANIFEST_NAME}: {e.line}")
        return report
    pkg = Package(root, manifest, spec)
    good = list(spec.variants)
    report.problems += [f"{MANIFEST_NAME}: {p}" for p in spec.problems]
    for name, v in spec.variants.items():
        if v.size is not None and v.size != sum(e.size for e in v.files):
            report.problems.append(
                f"variant {name}: recorded size {v.size} is not the sum of its files; rebuild the package"
            )
    report.variants = good
    integrity = pkg.integrity_problems(variants=good, hashes=hashes)
    report.problems += integrity
    listed = {e["path"] for e in pkg.listed_files(good)}
    report.files_checked = len(listed)
    named = set()  # files a variant names, broken variants included: reported once, as that variant's problem
    for v in manifest["variants"].values():
        if isinstance(v, dict):
            raw = v.get("files") if isinstance(v.get("files"), list) else []
            named.update([v.get("file")] + [e.get("path") for e in raw if isinstance(e, dict)])
    named = listed | {n for n in named if isinstance(n, str)}
    report.problems += _tree_problems(root, listed, listed | named)
    if graphs:
        damaged = {line.split(":", 1)[0] for line in integrity}
        read = _reader(reader)
        report.graph_reader = read.__name__.removeprefix("_io_via_")
        for name in good:
            v = manifest["variants"][name]
            if any(f["path"] in damaged for f in v["files"]):
                continue  # already reported; parsing a damaged graph says nothing new
            report.problems += _graph_problems(root, name, v, spec.variants[name].io, read, spec.dims)
            report.graphs_checked += 1
    return report


def _tree_problems(root: Path, checked: set[str], named: set[str]) -> list[str]:
    """Symlinks leaving the package (``checked`` files are reported by the integrity check), and graph
    files the manifest does not name."""
    problems = []
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink() and rel not in checked:
                target = p.resolve()
                if target != real_root and real_root not in target.parents:
                    problems.append(
                        f"{rel}: symlink points outside the package ({target}); packages must be self-contained, "
                        "copy the file in"
                    )
                    continue
            if name in filenames and name.endswith(GRAPH_SUFFIXES) and rel not in named:
                problems.append(f"{rel}: ONNX file not listed in the manifest; remove it or rebuild the package")
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return problems


def _graph_problems(root: Path, name: str, variant: dict, contract: dict, read, dims) -> list[str]:
    rel = variant["file"]
    try:
        io = read(root / rel)
    except Exception as e:  # a graph that does not parse is a verification failure, not a crash
        first = str(e).splitlines()[0][:120] if str(e) else ""
        return [f"{rel}: cannot be read as an ONNX graph ({type(e).__name__}: {first}); rebuild variant {name}"]
    problems = _dims_problems(rel, io, dims)
    for kind, have in (("input", io.inputs), ("output", io.outputs)):
        want = {t["name"]: (t["dtype"], t["shape"]) for t in contract[kind + "s"]}
        missing = [n for n in want if n not in have]
        extra = [n for n in have if n not in want]
        if missing:
            problems.append(
                f"{rel}: graph lacks {kind}{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} of the manifest's I/O contract"
            )
        if extra:
            problems.append(
                f"{rel}: graph {kind}{'s' if len(extra) > 1 else ''} {', '.join(extra[:4])} not in the manifest's "
                "I/O contract"
            )
        for n in want:
            if n in have:
                why = _mismatch(want[n], have[n])
                if why:
                    problems.append(f"{rel}: {kind} {n} {why}")
    for t in contract.get("optional_inputs") or []:
        if t["name"] not in io.optional:
            problems.append(
                f"{rel}: graph lacks the optional input {t['name']} the manifest lists; rebuild variant {name}"
            )
        else:
            why = _mismatch((t["dtype"], t["shape"]), io.optional[t["name"]])
            if why:
                problems.append(f"{rel}: optional input {t['name']} {why}")
    understated = _requirement_understated(root / rel, variant.get("requires"))
    if understated:
        problems.append(f"{rel}: {understated}; rebuild variant {name}")
    if io.external is not None:
        listed = {e["path"] for e in variant["files"]}
        base = PurePosixPath(rel).parent
        for loc in io.external:
            p = (base / loc).as_posix()
            if p not in listed:
                problems.append(
                    f"{rel}: graph needs external data {p}, which variant {name} does not list; rebuild the package"
                )
    return problems


def _requirement_understated(graph: Path, requires) -> str:
    """ "" when the recorded requirement is at least what the graph needs (onnx reads it), else the gap."""
    from .compat import version_tuple

    need = requires.get("onnxruntime") if isinstance(requires, dict) else None
    if need is None:
        return ""
    try:
        import onnx

        from quant.requirements import requirement
    except ImportError:  # a runtime-only install: the field's form was checked, the graph is not parsed
        return ""
    derived = requirement(onnx.load(str(graph), load_external_data=False))["onnxruntime"]
    if version_tuple(derived) > version_tuple(need):
        return f"manifest says it needs onnxruntime >= {need} but its graph needs >= {derived}"
    return ""


def _dims_problems(rel: str, io: GraphIO, dims) -> list[str]:
    """The manifest's model dims against the graph: layers, heads, head dim, vocabulary, position table."""
    out = []
    layers = {n.split(".")[1] for n in io.inputs if n.startswith("past_key_values.") and n.count(".") == 2}
    if len(layers) != dims.n_layer:
        out.append(
            f"{rel}: graph has {len(layers)} layers of KV cache, the manifest's model.n_layer says {dims.n_layer}"
        )
    past = io.inputs.get("past_key_values.0.key")
    if past and past[1] and len(past[1]) == 4:
        for axis, key, want in ((1, "n_head", dims.n_head), (3, "head_dim", dims.head_dim)):
            have = past[1][axis]
            if isinstance(have, int) and have != want:
                out.append(f"{rel}: graph's KV cache has {key} {have}, manifest's model.{key} says {want}")
    logits = io.outputs.get("logits")
    if logits and logits[1] and isinstance(logits[1][-1], int) and logits[1][-1] != dims.vocab_size:
        have = logits[1][-1]
        out.append(f"{rel}: graph's logits have {have} entries, manifest's model.vocab_size says {dims.vocab_size}")
    if io.positions is not None and io.positions < dims.n_positions:
        out.append(
            f"{rel}: graph's position table has {io.positions} rows, manifest's model.n_positions says "
            f"{dims.n_positions}; rebuild the package"
        )
    return out


def _mismatch(want: tuple, have: tuple) -> str | None:
    (wd, ws), (hd, hs) = want, have
    if hd is not None and wd != hd:
        return f"has dtype {hd}, the manifest says {wd}"
    if hs is None:  # the graph carries no shape: nothing to compare
        return None
    if len(ws) != len(hs):
        return f"has rank {len(hs)} {list(hs)}, the manifest says {list(ws)}"
    for w, h in zip(ws, hs, strict=False):
        if isinstance(w, int) and isinstance(h, int) and w != h:
            return f"has shape {list(hs)}, the manifest says {list(ws)}"
        if isinstance(w, str) and isinstance(h, int) and h > 0:
            return f"is fixed at {list(hs)} where the manifest has dynamic {list(ws)}"
    return None


# -- graph readers ---------------------------------------------------------------------------------
def _reader(which: str):
    if which == "onnx" or which == "auto":
        try:
            import onnx  # noqa: F401

            return _io_via_onnx
        except ImportError:
            if which == "onnx":
                raise PackageError("verifying graphs with onnx needs the onnx package; pip install onnx") from None
    return _io_via_onnxruntime


def _io_via_onnx(path: Path) -> GraphIO:
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)

    def one(vi):
        t = vi.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else None
        if not t.HasField("shape"):
            return dtype, None
        return dtype, [
            d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
            for d in t.shape.dim
        ]

    inits = {i.name for i in model.graph.initializer}
    external = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            external.update(e.value for e in t.external_data if e.key == "location")
    return GraphIO(
        {vi.name: one(vi) for vi in model.graph.input if vi.name not in inits},
        {vi.name: one(vi) for vi in model.graph.output},
        sorted(external),
        {vi.name: one(vi) for vi in model.graph.input if vi.name in inits},
        _position_rows(model),
    )


def _position_rows(model) -> int | None:
    """Rows of the table ``position_ids`` index (a Gather on position_ids, or an initializer named ``*wpe*``)."""
    by_name = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == "position_ids":
            t = by_name.get(node.input[0])
            if t is not None and len(t.dims) == 2:
                return int(t.dims[0])
    for t in model.graph.initializer:
        if "wpe" in t.name and len(t.dims) == 2:
            return int(t.dims[0])
    return None


def _io_via_onnxruntime(path: Path) -> GraphIO:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def one(arg):
        return _ORT_DTYPES.get(arg.type, arg.type), arg.shape

    return GraphIO(
        {a.name: one(a) for a in sess.get_inputs()},
        {a.name: one(a) for a in sess.get_outputs()},
        None,
        {a.name: one(a) for a in sess.get_overridable_initializers()},
    )
