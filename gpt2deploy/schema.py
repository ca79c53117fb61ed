"""The manifest schema: one validator, run once, turning the raw JSON into typed objects.

A package is untrusted input. ``parse_manifest(data, root)`` checks types, required keys, ranges and
every path (relative, inside the package, a variant's graph among its hashed files) and returns a
:class:`PackageSpec` whose :class:`Variant` objects carry resolved paths; the runtime passes those along
instead of looking raw dict entries up again. Any violation is one line naming the key
(:class:`PackageError`). ``parse_manifest(..., collect=True)`` keeps going past a broken variant and
lists its problem instead (what ``verify`` reports).

Optional keys may be absent (older packages); when present they are validated too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import PackageError

KV_CACHE_MODES = ("concat", "shared")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_VERSION = re.compile(r"^\d{1,4}\.\d{1,4}(\.\d{1,6})?$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

#: Ranges for model dims: wide enough for any GPT-2-family model, narrow enough that a forged value cannot
#: make the runtime allocate absurd buffers.
DIM_RANGES = {
    "n_layer": (1, 512),
    "n_head": (1, 1024),
    "head_dim": (1, 4096),
    "hidden_size": (1, 1 << 17),
    "vocab_size": (1, 1 << 22),
    "n_positions": (1, 1 << 20),
}
MAX_FILE_SIZE = 1 << 42  # 4 TiB
_FIX = "rebuild the package with 'gpt2deploy build' (or 'gpt2deploy export')"


class SchemaError(PackageError):
    """One manifest key violates the schema."""

    def __init__(self, key: str, problem: str, where: str = "manifest"):
        super().__init__(f"{where}: key {key} {problem}; {_FIX}")
        self.key, self.problem = key, problem
        self.line = f"key {key} {problem}; {_FIX}"  # without the manifest's path


def _fail(key: str, problem: str):
    raise SchemaError(key, problem)


def _type_name(value) -> str:
    return (
        "null"
        if value is None
        else {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)
    )


def _obj(value, key: str, required: bool = True) -> dict | None:
    if value is None and not required:
        return None
    if not isinstance(value, dict):
        _fail(key, f"must be an object (got {_type_name(value)})")
    return value


def _str(value, key: str, required: bool = True, max_len: int = 4096) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str):
        _fail(key, f"must be a string (got {_type_name(value)})")
    if len(value) > max_len:
        _fail(key, f"is longer than {max_len} characters")
    return value


def _int(value, key: str, lo: int | None = None, hi: int | None = None, required: bool = True) -> int | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(key, f"must be an integer (got {_type_name(value)} {_short(value)})")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        _fail(key, f"is {_short(value)}, outside {lo}..{hi}")
    return value


def _num(value, key: str, lo: float | None = None, hi: float | None = None, required: bool = True, open_lo=False):
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(key, f"must be a finite number (got {_type_name(value)} {_short(value)})")
    if lo is not None and (value <= lo if open_lo else value < lo):
        _fail(key, f"is {value}, must be {'>' if open_lo else '>='} {lo}")
    if hi is not None and value > hi:
        _fail(key, f"is {value}, must be <= {hi}")
    return value


def _bool(value, key: str, required: bool = False) -> bool | None:
    if value is None and not required:
        return None
    if not isinstance(value, bool):
        _fail(key, f"must be true or false (got {_type_name(value)} {_short(value)})")
    return value


def _list(value, key: str, required: bool = True, max_len: int = 100_000) -> list | None:
    if value is None and not required:
        return None
    if not isinstance(value, list):
        _fail(key, f"must be an array (got {_type_name(value)})")
    if len(value) > max_len:
        _fail(key, f"has {len(value)} items, more than {max_len}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- typed objects ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelDims:
    n_layer: int
    n_head: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    n_positions: int
    eos_token_id: int | None = None
    bos_token_id: int | None = None

    @classmethod
    def from_manifest(cls, model: dict) -> ModelDims:
        return parse_dims(model)


@dataclass(frozen=True)
class FileEntry:
    """A hashed file: ``path`` relative to the package (POSIX), ``local`` that path under the package root."""

    path: str
    sha256: str
    size: int
    local: Path

    def as_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class Variant:
    """One validated variant. ``graph`` is its graph file (root / ``file``), one of ``files`` (all hashed)."""

    name: str
    file: str
    graph: Path
    files: tuple[FileEntry, ...]
    size: int | None
    precision: str
    kv_cache: str
    providers: tuple[str, ...]
    io: dict
    accuracy: dict | None
    requires: dict[str, str] = field(default_factory=dict)
    #: a decode step may hold rows of different lengths, each from column 0 of an in-place cache
    ragged_rows: bool = False

    @property
    def kv_shared(self) -> bool:
        return self.kv_cache == "shared"

    @property
    def gate_failed(self) -> bool:
        return isinstance(self.accuracy, dict) and self.accuracy.get("passed") is False

    @property
    def optional_inputs(self) -> frozenset[str]:
        return frozenset(t["name"] for t in self.io.get("optional_inputs") or [])

    @property
    def data_files(self) -> list[Path]:
        """The variant's files other than its graph (external weights)."""
        return [e.local for e in self.files if e.path != self.file]

    def runs_on(self, provider: str) -> bool:
        return not self.providers or provider in self.providers


@dataclass(frozen=True)
class PackageSpec:
    root: Path
    dims: ModelDims
    files: tuple[FileEntry, ...]
    variants: dict[str, Variant]
    generation: dict
    problems: tuple[str, ...] = ()  # broken variants, with collect=True only


# -- parsing ---------------------------------------------------------------------------------------
def parse_dims(model) -> ModelDims:
    model = _obj(model, "model")
    values = {k: _int(model.get(k), f"model.{k}", lo, hi) for k, (lo, hi) in DIM_RANGES.items()}
    if values["n_head"] * values["head_dim"] != values["hidden_size"]:
        _fail(
            "model.hidden_size",
            f"is {values['hidden_size']}, not n_head x head_dim ({values['n_head']} x {values['head_dim']})",
        )
    vocab = values["vocab_size"]
    for k in ("eos_token_id", "bos_token_id"):
        values[k] = _int(model.get(k), f"model.{k}", 0, vocab - 1, required=False)
    return ModelDims(**values)


def safe_relpath(rel, key: str, root: Path) -> Path:
    """``root / rel`` for a relative POSIX path that names a file inside the package.

    This is the manifest's side; where a symlink on disk leads is checked when files are used
    (``Package.integrity_problems``, ``Package.contained``)."""
    rel = _str(rel, key, max_len=1024)
    if not rel or "\x00" in rel or "\\" in rel or PureWindowsPath(rel).drive or not rel.isprintable():
        _fail(key, f"{_short(rel)} is not a relative POSIX path inside the package")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts:
        _fail(key, f"{_short(rel)} points outside the package; packages must be self-contained")
    if p.name in ("", "."):
        _fail(key, f"{_short(rel)} names no file")
    return root / rel


def _keyname(k) -> str:
    k = str(k)
    return k if len(k) <= 64 and k.isprintable() else _short(k)


def _entry(e, key: str, root: Path) -> FileEntry:
    e = _obj(e, key)
    local = safe_relpath(e.get("path"), f"{key}.path", root)
    sha = _str(e.get("sha256"), f"{key}.sha256")
    if not _SHA256.match(sha):
        _fail(f"{key}.sha256", "must be 64 lowercase hex digits")
    size = _int(e.get("size"), f"{key}.size", 0, MAX_FILE_SIZE)
    return FileEntry(e["path"], sha, size, local)


#: Element types a graph input or output may have (what ONNX Runtime and Triton both name).
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool")
_TENSOR_NAME = re.compile(r"^[A-Za-z0-9_.:/-]{1,256}$")
_DIM_NAME = re.compile(r"^[A-Za-z0-9_.+ -]{1,128}$")


def _tensor_list(value, key: str, required: bool) -> list:
    items = _list(value, key, required=required, max_len=8192) or []
    for i, t in enumerate(items):
        k = f"{key}[{i}]"
        t = _obj(t, k)
        if not _TENSOR_NAME.match(_str(t.get("name"), f"{k}.name", max_len=256)):
            _fail(f"{k}.name", f"{_short(t['name'])} is not a tensor name (letters, digits, '_', '.', ':', '/', '-')")
        if _str(t.get("dtype"), f"{k}.dtype", max_len=32) not in DTYPES:
            _fail(f"{k}.dtype", f"is {_short(t['dtype'])}, not one of {', '.join(DTYPES)}")
        for j, d in enumerate(_list(t.get("shape"), f"{k}.shape", max_len=16)):
            ok = isinstance(d, str) and _DIM_NAME.match(d) or (type(d) is int and 0 <= d <= 1 << 31)
            if not ok:
                _fail(f"{k}.shape[{j}]", f"must be a non-negative integer or an axis name (got {_short(d)})")
    return items


def parse_io(io, key: str) -> dict:
    io = _obj(io, key)
    _tensor_list(io.get("inputs"), f"{key}.inputs", True)
    _tensor_list(io.get("outputs"), f"{key}.outputs", True)
    _tensor_list(io.get("optional_inputs"), f"{key}.optional_inputs", False)
    _str(io.get("kv_layout"), f"{key}.kv_layout", required=False)
    return io


def parse_requires(value, key: str) -> dict[str, str]:
    """``{"onnxruntime": "1.22"}``: the minimum version of each runtime library, MAJOR.MINOR[.PATCH]."""
    value = _obj(value, key, required=False) or {}
    out = {}
    for lib, ver in value.items():
        if not _NAME.match(lib):
            _fail(f"{key}", f"has a bad runtime name {_short(lib)}")
        ver = _str(ver, f"{key}.{lib}", max_len=32)
        if not _VERSION.match(ver):
            _fail(f"{key}.{lib}", f"is {_short(ver)}, not a version MAJOR.MINOR[.PATCH]")
        out[lib] = ver
    return out


def _accuracy(acc, key: str) -> dict | None:
    acc = _obj(acc, key, required=False)
    if acc is None:
        return None
    _bool(acc.get("passed"), f"{key}.passed")
    for sub in ("metrics", "thresholds"):
        d = _obj(acc.get(sub), f"{key}.{sub}", required=False) or {}
        for k, v in d.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                _fail(f"{key}.{sub}.{k}", f"must be a number (got {_type_name(v)})")
    for i, f in enumerate(_list(acc.get("failures"), f"{key}.failures", required=False) or []):
        _str(f, f"{key}.failures[{i}]")
    _obj(acc.get("reference"), f"{key}.reference", required=False)
    _obj(acc.get("measured_on"), f"{key}.measured_on", required=False)
    return acc


def parse_variant(name, v, key: str, root: Path, io: dict) -> Variant:
    if not _NAME.match(name):
        _fail(key, "has a bad variant name (letters, digits, '_', '.', '-')")
    v = _obj(v, key)
    files = tuple(_entry(e, f"{key}.files[{i}]", root) for i, e in enumerate(_list(v.get("files"), f"{key}.files")))
    if not files:
        _fail(f"{key}.files", "is empty; a variant lists its graph and weight files")
    file = _str(v.get("file"), f"{key}.file", max_len=1024)
    graph = safe_relpath(file, f"{key}.file", root)
    if file not in {e.path for e in files}:
        _fail(f"{key}.file", f"{_short(file)} is not among {key}.files, so its sha256 is not checked")
    size = _int(v.get("size"), f"{key}.size", 0, MAX_FILE_SIZE, required=False)
    precision = _str(v.get("precision"), f"{key}.precision", required=False, max_len=32) or name
    kv = v.get("kv_cache", "concat")
    if kv not in KV_CACHE_MODES:
        _fail(f"{key}.kv_cache", f"is {_short(kv)}, not one of {', '.join(KV_CACHE_MODES)}")
    providers = _list(v.get("providers"), f"{key}.providers", required=False, max_len=16) or []
    for i, p in enumerate(providers):
        _str(p, f"{key}.providers[{i}]", max_len=64)
    own_io = parse_io(v["io"], f"{key}.io") if v.get("io") is not None else io
    for sub in ("recipe", "parity", "sample_check", "libraries"):
        _obj(v.get(sub), f"{key}.{sub}", required=False)
    for lib, ver in (v.get("libraries") or {}).items():
        _str(ver, f"{key}.libraries.{lib}", max_len=64)
    parity = v.get("parity") or {}
    _bool(parity.get("passed"), f"{key}.parity.passed")
    for k in ("max_abs_diff", "atol"):
        _num(parity.get(k), f"{key}.parity.{k}", required=False)
    _int(parity.get("decode_steps"), f"{key}.parity.decode_steps", 0, required=False)
    _int(v.get("opset"), f"{key}.opset", 1, 1000, required=False)
    _str(v.get("note"), f"{key}.note", required=False)
    _bool(v.get("allowed_regression"), f"{key}.allowed_regression")
    ragged = bool(_bool(v.get("ragged_rows"), f"{key}.ragged_rows"))
    if ragged and kv != "shared":
        _fail(f"{key}.ragged_rows", 'is true but kv_cache is not "shared"; rebuild the package')
    return Variant(
        name=name,
        file=file,
        graph=graph,
        files=files,
        size=size,
        precision=precision,
        kv_cache=kv,
        providers=tuple(providers),
        io=own_io,
        accuracy=_accuracy(v.get("accuracy"), f"{key}.accuracy"),
        requires=parse_requires(v.get("requires"), f"{key}.requires"),
        ragged_rows=ragged,
    )


def parse_generation(gen, vocab_size: int) -> dict:
    """The package's generation defaults, each known key type- and range-checked."""
    gen = _obj(gen, "generation", required=False) or {}
    k = "generation."
    _int(gen.get("max_new_tokens"), k + "max_new_tokens", 1, 1 << 20, required=False)
    _int(gen.get("max_length"), k + "max_length", 1, 1 << 20, required=False)
    _bool(gen.get("do_sample"), k + "do_sample")
    _num(gen.get("temperature"), k + "temperature", 0.0, 1e6, required=False)  # > 0 is checked when sampling
    _int(gen.get("top_k"), k + "top_k", 0, 1 << 22, required=False)
    _num(gen.get("top_p"), k + "top_p", 0.0, 1.0, required=False, open_lo=True)
    _num(gen.get("repetition_penalty"), k + "repetition_penalty", 0.0, 1e6, required=False, open_lo=True)
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = gen.get(name)
        if isinstance(value, list):
            if not value or len(value) > 64:
                _fail(k + name, "must list 1 to 64 token ids")
            for i, t in enumerate(value):
                _int(t, f"{k}{name}[{i}]", 0, vocab_size - 1)
        else:
            _int(value, k + name, 0, vocab_size - 1, required=False)
    return gen


def _general(data: dict) -> None:
    for key in ("source", "build"):
        _obj(data.get(key), key, required=False)
    src = data.get("source") or {}
    _str(src.get("model"), "source.model", required=False)
    _str(src.get("weights_sha256"), "source.weights_sha256", required=False)
    _num(src.get("n_params"), "source.n_params", 0, required=False)
    for key in ("gpt2deploy_version", "created"):
        _str(data.get(key), key, required=False, max_len=256)
    build = data.get("build") or {}
    rejected = _obj(build.get("rejected"), "build.rejected", required=False) or {}
    for name, why in rejected.items():
        _list(why, f"build.rejected.{name}")
    _bool(build.get("reference_in_package"), "build.reference_in_package")


def parse_manifest(data: dict, root: str | Path, collect: bool = False) -> PackageSpec:
    """Validate a manifest (already JSON-decoded, format and schema version checked) against ``root``.

    Raises PackageError naming the first bad key. With ``collect``, a broken variant is left out and its
    problem listed in ``PackageSpec.problems`` (the rest must still be valid).
    """
    root = Path(root).absolute()
    try:
        dims = parse_dims(data.get("model"))
        io = parse_io(data.get("io"), "io")
        files_obj = _obj(data.get("files"), "files")
        files = tuple(_entry(e, f"files.{_keyname(k)}", root) for k, e in files_obj.items())
        generation = parse_generation(data.get("generation"), dims.vocab_size)
        _general(data)
        variants, problems = {}, []
        for name, v in _obj(data.get("variants"), "variants").items():
            try:
                variants[name] = parse_variant(name, v, f"variants.{_keyname(name)}", root, io)
            except SchemaError as e:
                if not collect:
                    raise
                problems.append(e.line)
    except SchemaError as e:
        raise SchemaError(e.key, e.problem, f"{root / 'manifest.json'}") from None
    return PackageSpec(root, dims, files, variants, generation, tuple(problems))
