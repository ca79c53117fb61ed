"""Fuzzing hostile packages and bad arguments (Hypothesis, bounded in examples and time).

Mutations of a built package's manifest (types, missing keys, paths, sizes, dims) and of its files, and
generated CLI arguments. Every command must end with exit code 0, 1 or 2, at most one ``error:`` line on
stderr and no traceback; read-only commands leave the package byte for byte as it was; a verified load
only ever opens a graph that is inside the package and matches a sha256 the manifest lists for it.

Counts are printed at the end of each test (``-s``): cases, clean errors, tracebacks, hangs.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

#: A command slower than this counts as a hang (the tiny package loads and generates in well under a second;
#: the margin is for a loaded CI machine).
HANG_SECONDS = 120.0
FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # the same cases on every run (CI must not flake on a new random draw)
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Stats:
    def __init__(self, name: str):
        self.name = name
        self.cases = self.ok = self.clean_errors = self.tracebacks = self.hangs = 0
        self.slow: list[str] = []

    def line(self) -> str:
        return (
            f"[fuzz] {self.name}: {self.cases} cases, {self.ok} ok, {self.clean_errors} clean errors, "
            f"{self.tracebacks} tracebacks, {self.hangs} hangs" + "".join(f"\n  slow: {s}" for s in self.slow)
        )


def _tree_hashes(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "->" + str(p.readlink())
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class Opened:
    """Records the graph files ONNX Runtime sessions are created from."""

    def __init__(self, monkeypatch):
        import onnxruntime as ort

        self.paths: list[Path] = []
        real = ort.InferenceSession

        def spy(path_or_bytes, *args, **kwargs):
            if isinstance(path_or_bytes, (str, Path)):
                self.paths.append(Path(path_or_bytes))
            return real(path_or_bytes, *args, **kwargs)

        monkeypatch.setattr(ort, "InferenceSession", spy)


def _verified_set(root: Path, manifest) -> set[Path]:
    """Real paths of files inside ``root`` whose sha256 matches an entry some variant lists for them."""
    out = set()
    real_root = root.resolve()
    variants = manifest.get("variants") if isinstance(manifest, dict) else None
    for v in (variants or {}).values() if isinstance(variants, dict) else ():
        files = v.get("files") if isinstance(v, dict) else None
        for e in files if isinstance(files, list) else ():
            if not (isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("sha256"), str)):
                continue
            try:
                p = (root / e["path"]).resolve()
            except (OSError, RuntimeError, ValueError):
                continue
            if real_root in p.parents and p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == e["sha256"]:
                out.add(p)
    return out


def _invoke(args: list, stats: Stats, input: bytes | None = None):
    from typer.testing import CliRunner

    from gpt2deploy.cli import app

    stats.cases += 1
    t0 = time.monotonic()
    r = CliRunner().invoke(app, [str(a) for a in args], input=input, catch_exceptions=True)
    took = time.monotonic() - t0
    if took > HANG_SECONDS:
        stats.hangs += 1
        stats.slow.append(f"{took:.0f}s: {' '.join(map(str, args))[:200]}")
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        stats.tracebacks += 1
        import traceback

        detail = "".join(traceback.format_exception(r.exception))[-3000:]
        pytest.fail(f"{args[:3]}...: raised {type(r.exception).__name__}: {r.exception}\n{detail}")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.exit_code in (0, 1, 2), (args, r.exit_code, r.stderr[-2000:])
    assert len(errors) <= 1, (args, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, (args, r.stderr[-2000:])
    if r.exit_code:
        assert errors or r.stdout.startswith("FAIL") or "FAIL" in r.stdout, (args, r.stderr[-2000:])
        stats.clean_errors += 1
    else:
        stats.ok += 1
    return r


# -- manifest mutations -------------------------------------------------------------------------------
def _key_paths(obj, prefix=(), depth=0) -> list[tuple]:
    out = []
    if depth > 5:
        return out
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        if isinstance(obj, list) and k > 3:  # the first I/O entries stand for the rest
            break
        out.append((*prefix, k))
        out += _key_paths(v, (*prefix, k), depth + 1)
    return out


HOSTILE_STRINGS = [
    "",
    "../tokenizer.json",
    "/etc/passwd",
    "onnx/../../x.onnx",
    "onnx\\model.onnx",
    "C:/model.onnx",
    "a\x00b",
    ".",
    "onnx",
    "onnx/model.onnx",
    "onnx/model_q4.onnx",
    "onnx/model_int8.onnx.data",
    "a\ud800b",
    "0" * 64,
    "1.22",
    "shared",
    "concat",
]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=4096),
    st.sampled_from([-1, 0, 1, 999, 2**31, 10**30, -(10**30)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(HOSTILE_STRINGS),
    st.text(max_size=12),
    st.lists(st.integers(min_value=-2, max_value=60000), max_size=3),
    st.dictionaries(st.sampled_from(["path", "sha256", "size", "onnxruntime", "x"]), st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def base_manifest(built_package) -> dict:
    return json.loads((built_package / "manifest.json").read_text())


def _mutated_copy(built_package: Path, base: dict, edits) -> tuple[Path, dict]:
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-"))
    dst = tmp / "pkg"
    shutil.copytree(built_package, dst, symlinks=True)
    manifest = json.loads(json.dumps(base))
    for path, op, value in edits:
        parent = manifest
        try:
            for k in path[:-1]:
                parent = parent[k]
            if op == "delete":
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    text = json.dumps(manifest, allow_nan=True, ensure_ascii=True)
    (dst / "manifest.json").write_text(text)
    return dst, manifest


@pytest.mark.timeout(1800)
def test_fuzz_manifest(built_package, base_manifest, monkeypatch, capsys):
    """Random edits of manifest keys; inspect, verify and a verified run (plus one of bench, triton, check)."""
    paths = _key_paths(base_manifest)
    stats = Stats("manifest")
    opened = Opened(monkeypatch)
    edit = st.tuples(st.sampled_from(paths), st.sampled_from(["delete", "replace", "replace"]), VALUES)
    extra = st.sampled_from(["bench", "triton", "check", "none"])

    @FUZZ
    @given(st.lists(edit, min_size=1, max_size=3), extra)
    def case(edits, other):
        pkg, manifest = _mutated_copy(built_package, base_manifest, edits)
        try:
            before = _tree_hashes(pkg)
            _invoke(["inspect", pkg], stats)
            _invoke(["verify", pkg], stats)
            opened.paths.clear()
            _invoke(["run", pkg, "-p", "Hello", "-n", "2"], stats)
            allowed = _verified_set(pkg, manifest)
            for p in opened.paths:
                assert p.resolve() in allowed, (p, edits)
            if other == "bench":
                _invoke(["bench", pkg, "--repeat", 1, "--warmup", 0, "--new-tokens", 2, "--no-long-context"], stats)
            elif other == "triton":
                _invoke(["triton", pkg, "-o", pkg.parent / "repo"], stats)
            elif other == "check":
                _invoke(["check", pkg, "--max-tokens", 128, "--no-record", "--threshold", "top1=0"], stats)
            assert _tree_hashes(pkg) == before, edits
        finally:
            shutil.rmtree(pkg.parent, ignore_errors=True)

    case()
    with capsys.disabled():
        print("\n" + stats.line())
    assert stats.tracebacks == 0 and stats.hangs == 0 and stats.cases >= 30


# -- targeted dims: values that disagree with the graph ---------------------------------------------
@pytest.mark.timeout(1200)
def test_fuzz_dims(built_package, base_manifest, capsys):
    stats = Stats("dims")
    dims = st.sampled_from(["n_layer", "n_head", "head_dim", "hidden_size", "vocab_size", "n_positions"])

    @settings(FUZZ, max_examples=20)
    @given(dims, st.integers(min_value=-2, max_value=5000))
    def case(key, value):
        pkg, _ = _mutated_copy(built_package, base_manifest, [(("model", key), "replace", value)])
        try:
            v = _invoke(["verify", pkg], stats)
            r = _invoke(["run", pkg, "-p", "Hello", "-n", "2", "--variant", "fp32"], stats)
            base = base_manifest["model"][key]
            if value != base and not (key == "n_positions" and 1 <= value < base):  # a shorter context is valid
                assert v.exit_code == 1, (key, value, v.stdout)
            if r.exit_code == 0:  # a context larger than the graph's passes the load; short generations work
                assert value == base or key == "n_positions", (key, value)
        finally:
            shutil.rmtree(pkg.parent, ignore_errors=True)

    case()
    with capsys.disabled():
        print("\n" + stats.line())
    assert stats.tracebacks == 0 and stats.hangs == 0


# -- file mutations ---------------------------------------------------------------------------------
FILE_OPS = ["truncate", "append", "delete", "swap_graph", "symlink_out", "empty", "garbage"]


@pytest.mark.timeout(1200)
def test_fuzz_files(built_package, base_manifest, monkeypatch, capsys):
    stats = Stats("files")
    opened = Opened(monkeypatch)
    files = sorted(p.relative_to(built_package).as_posix() for p in built_package.rglob("*") if p.is_file())
    files.remove("manifest.json")

    @settings(FUZZ, max_examples=20)
    @given(st.sampled_from(files), st.sampled_from(FILE_OPS), st.sampled_from(["fp32", "int8", "int4", None]))
    def case(rel, op, variant):
        pkg, _ = _mutated_copy(built_package, base_manifest, [])
        try:
            p = pkg / rel
            if op == "truncate":
                p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
            elif op == "append":
                with p.open("ab") as f:
                    f.write(b"\0junk")
            elif op == "delete":
                p.unlink()
            elif op == "swap_graph":
                other = "model.onnx" if rel == "onnx/model_q4.onnx" else "model_q4.onnx"
                shutil.copyfile(pkg / "onnx" / other, p)
            elif op == "symlink_out":
                outside = pkg.parent / "outside"
                shutil.copyfile(p, outside)
                p.unlink()
                p.symlink_to(outside)
            elif op == "empty":
                p.write_bytes(b"")
            else:
                p.write_bytes(b"\x08\x01garbage" * 10)
            before = _tree_hashes(pkg)
            opened.paths.clear()
            args = ["run", pkg, "-p", "Hello", "-n", "2", *(["--variant", variant] if variant else [])]
            r = _invoke(args, stats)
            allowed = _verified_set(pkg, base_manifest)
            for q in opened.paths:
                assert q.resolve() in allowed, (q, rel, op)
            v = _invoke(["verify", pkg], stats)
            assert v.exit_code == 1, (rel, op, v.stdout)  # every change here is a verification failure
            if r.exit_code == 0:  # then the files it uses were intact
                used = [e["path"] for e in base_manifest["files"].values()]
                used += [e["path"] for e in base_manifest["variants"][variant or "int4"]["files"]]
                assert rel not in used, (rel, op, variant)
            _invoke(["inspect", pkg], stats)
            assert _tree_hashes(pkg) == before
        finally:
            shutil.rmtree(pkg.parent, ignore_errors=True)

    case()
    with capsys.disabled():
        print("\n" + stats.line())
    assert stats.tracebacks == 0 and stats.hangs == 0


# -- CLI arguments ----------------------------------------------------------------------------------
NUMBERS = st.one_of(
    st.integers(min_value=-5, max_value=10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e309", "abc", "", "0x10", "10" * 20, "1.5", "-0"]),
)
RUN_OPTIONS = [
    "--max-new-tokens",
    "--temperature",
    "--top-k",
    "--top-p",
    "--repetition-penalty",
    "--seed",
    "--threads",
    "--device",
    "--variant",
]
TEXT = st.one_of(st.text(max_size=30), st.sampled_from(["a\ud800b", "\udcff", "\x00", "-", "--help-me", "é" * 5]))


@pytest.mark.timeout(1800)
def test_fuzz_run_arguments(built_package, capsys):
    stats = Stats("run arguments")
    option = st.tuples(st.sampled_from(RUN_OPTIONS), st.one_of(NUMBERS, TEXT))
    flag = st.sampled_from(["--do-sample", "--truncate", "--ignore-eos", "--json", "--no-verify", "--bogus", "-x"])

    @settings(FUZZ, max_examples=40)
    @given(TEXT, st.lists(option, max_size=3), st.lists(flag, max_size=2), st.one_of(st.none(), TEXT))
    def case(prompt, options, flags, stop):
        before = _tree_hashes(built_package)
        args = ["run", built_package, "-p", prompt]
        for name, value in options:
            args += [name, value]
        args += flags
        if stop is not None:
            args += ["--stop", stop]
        if "--max-new-tokens" not in args:
            args += ["-n", "3"]
        r = _invoke(args, stats, input=b"stdin \xff\xfe text" if prompt == "-" else None)
        if r.exit_code == 0:
            for name, value in options:
                if name in ("--temperature", "--top-p", "--repetition-penalty"):
                    assert math.isfinite(float(value)), args
        assert _tree_hashes(built_package) == before

    case()
    with capsys.disabled():
        print("\n" + stats.line())
    assert stats.tracebacks == 0 and stats.hangs == 0


@pytest.mark.timeout(1200)
def test_fuzz_other_commands_arguments(built_package, tmp_path, capsys):
    stats = Stats("bench/triton/verify/inspect/quantize arguments")
    commands = st.sampled_from(["bench", "triton", "verify", "inspect", "quantize", "export", "check"])
    # sizes: invalid, small, or far too large (refused up front); mid-sized valid ones are real work, not fuzzing
    sizes = st.one_of(
        st.integers(min_value=-3, max_value=24).map(str),
        st.sampled_from(["abc", "nan", "1e3", "10" * 20, str(10**8), str(2**31)]),
    )
    sized = {"--batch", "--prompt-tokens", "--new-tokens", "--repeat", "--curve-points"}
    opts = {
        "bench": ["--batch", "--prompt-tokens", "--new-tokens", "--repeat", "--threads", "--curve-points"],
        "triton": ["--instances", "--threads", "--name", "--variant", "--device"],
        "verify": ["--no-graphs"],
        "inspect": ["--json"],
        "quantize": ["--block-size", "--exclude", "--threshold"],
        "export": ["--atol", "--opset"],
        "check": ["--threshold", "--threads"],
    }

    @settings(FUZZ, max_examples=30)
    @given(commands, st.data())
    def case(command, data):
        before = _tree_hashes(built_package)
        names = data.draw(st.lists(st.sampled_from(opts[command]), max_size=2))
        args = [command, built_package]
        for n in names:
            args += [n, data.draw(sizes if n in sized else st.one_of(NUMBERS, TEXT))]
        if command == "bench":
            args += ["--warmup", "0", "--no-long-context"]
            args += [] if "--repeat" in names else ["--repeat", "1"]
            args += [] if "--new-tokens" in names else ["--new-tokens", "2"]
        if command in ("triton", "export"):
            args += ["-o", tmp_path / "out" / "x"]
        if command == "check":
            args += ["--no-record", "--max-tokens", "128"]
        if command == "quantize":
            args += ["--mode", "int8"]  # the variant exists: refused without --force, before any work
        _invoke(args, stats)
        assert _tree_hashes(built_package) == before

    case()
    with capsys.disabled():
        print("\n" + stats.line())
    assert stats.tracebacks == 0 and stats.hangs == 0
