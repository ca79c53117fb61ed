"""Hostile packages and bad input, case by case: one clean line (or a correct result), never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gpt2deploy
from gpt2deploy.errors import GenerationError, IntegrityError, PackageError, UsageError
from gpt2deploy.package import Package
from gpt2deploy.schema import Variant, parse_manifest

ROOT = Path(__file__).resolve().parent.parent
READ_COMMANDS = ("inspect", "verify", "check", "bench", "triton")


def _edit(root: Path, change) -> None:
    m = json.loads((root / "manifest.json").read_text())
    change(m)
    (root / "manifest.json").write_text(json.dumps(m, indent=2))


def _one_error(r, code: int = 2, *needles: str) -> str:
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.exit_code == code, (r.exit_code, r.output)
    assert len(err) == 1 and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def _args(command: str, pkg: Path) -> list:
    return {
        "run": ["run", pkg, "-p", "Hello", "-n", "2"],
        "inspect": ["inspect", pkg],
        "verify": ["verify", pkg],
        "check": ["check", pkg, "--max-tokens", "128", "--no-record"],
        "bench": ["bench", pkg, "--repeat", "1", "--warmup", "0", "--no-long-context", "--new-tokens", "2"],
        "triton": ["triton", pkg, "-o", pkg.parent / "repo"],
    }[command]


# -- 1. the graph a verified load runs is always one the manifest hashes ------------------------------
def test_variant_file_outside_the_package_is_refused_everywhere(built_copy, built_package, cli):
    _edit(built_copy, lambda m: m["variants"]["int4"].__setitem__("file", str(built_package / "onnx/model_q4.onnx")))
    for command in ("run", *READ_COMMANDS):
        r = cli(*_args(command, built_copy))
        code = 1 if command == "verify" else 2
        line = _one_error(r, code)
        if command != "verify":
            assert "key variants.int4.file" in line and "points outside the package" in line, line
    with pytest.raises(PackageError, match="variants.int4.file"):
        gpt2deploy.load(built_copy, variant="int4")


def test_variant_file_must_be_among_its_hashed_files(built_copy, cli):
    # a graph inside the package, but not the one the variant's sha256 entries cover
    _edit(built_copy, lambda m: m["variants"]["int4"].__setitem__("file", "onnx/model_int8.onnx"))
    line = _one_error(cli(*_args("run", built_copy)), 2, "variants.int4.file", "is not among variants.int4.files")
    assert "sha256 is not checked" in line


def test_verified_load_opens_only_the_hashed_graph(built_package, monkeypatch):
    import onnxruntime as ort

    opened = []
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda p, *a, **k: opened.append(Path(p)) or real(p, *a, **k))
    model = gpt2deploy.load(built_package, variant="int8")
    spec = model.session.spec
    assert isinstance(spec, Variant) and spec.graph == built_package.absolute() / "onnx/model_int8.onnx"
    assert opened == [spec.graph] and spec.file in {e.path for e in spec.files}


def test_symlinked_graph_outside_is_refused_without_verify(built_copy, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    graph = built_copy / "onnx/model_q4.onnx"
    outside.write_bytes(graph.read_bytes())
    graph.unlink()
    graph.symlink_to(outside)
    with pytest.raises(IntegrityError, match="points outside the package"):
        gpt2deploy.load(built_copy, variant="int4", verify=False)


# -- 2. malformed manifests: one line naming the key ---------------------------------------------------
@pytest.mark.parametrize(
    "change, key",
    [
        (lambda m: m["variants"].__setitem__("int8", "not an object"), "variants.int8 must be an object"),
        (lambda m: m["variants"]["int8"].pop("file"), "variants.int8.file must be a string"),
        (lambda m: m.__setitem__("generation", "greedy"), "generation must be an object"),
        (lambda m: m["model"].__setitem__("n_head", "4"), "model.n_head must be an integer"),
        (lambda m: m["model"].__setitem__("n_layer", 10**9), "model.n_layer is 1000000000, outside 1..512"),
        (lambda m: m["variants"]["int8"]["files"][0].__setitem__("size", -1), "variants.int8.files[0].size"),
        (lambda m: m["variants"]["int8"].__setitem__("kv_cache", "ring"), "variants.int8.kv_cache"),
        (lambda m: m["generation"].__setitem__("temperature", float("inf")), "generation.temperature"),
        (
            lambda m: m["variants"]["int8"].__setitem__("requires", {"onnxruntime": "new"}),
            "variants.int8.requires.onnxruntime is 'new', not a version",
        ),
    ],
)
def test_malformed_manifest_is_one_line(built_copy, cli, change, key):
    _edit(built_copy, change)
    for command in ("run", "inspect", "bench", "triton", "check"):
        _one_error(cli(*_args(command, built_copy)), 2, key)
    r = cli("verify", built_copy)
    assert r.exit_code == 1 and any(key in line for line in r.stdout.splitlines()), r.output
    with pytest.raises(PackageError, match="key " + key.split()[0].replace("[", r"\[").replace("]", r"\]")):
        gpt2deploy.load(built_copy)


def test_requires_is_optional_and_typed(built_copy):
    _edit(built_copy, lambda m: m["variants"]["int8"].pop("requires", None))
    spec = Package.open(built_copy).variant_spec("int8")
    assert spec.requires == {}  # packages written before the key existed still load
    _edit(built_copy, lambda m: m["variants"]["int8"].__setitem__("requires", {"onnxruntime": "1.22"}))
    assert Package.open(built_copy).variant_spec("int8").requires == {"onnxruntime": "1.22"}
    m = json.loads((built_copy / "manifest.json").read_text())
    m["variants"]["int8"]["requires"] = {"onnxruntime": 1.22}
    with pytest.raises(PackageError, match="requires.onnxruntime must be a string"):
        parse_manifest(m, built_copy)


@pytest.mark.parametrize(
    "key, value, problem",
    [
        ("n_layer", 3, "graph has 2 layers of KV cache"),
        ("n_positions", 4096, "position table has 128 rows"),
        ("vocab_size", 60000, "logits have 50257 entries"),
    ],
)
def test_dims_disagreeing_with_the_graph(built_copy, cli, key, value, problem):
    _edit(built_copy, lambda m: m["model"].__setitem__(key, value))
    r = cli("verify", built_copy)
    assert r.exit_code == 1 and any(problem in line for line in r.stdout.splitlines()), r.output
    r = cli("run", built_copy, "-p", "Hello", "-n", "2", "--variant", "fp32")
    if key == "n_positions":  # the load passes; positions inside the graph's table still generate
        assert r.exit_code == 0, r.output
        r = cli("run", built_copy, "-p", "Hello " * 100, "-n", "200", "--variant", "fp32", "--ignore-eos")
    _one_error(r, 2)


def test_n_head_and_head_dim_against_the_graph(built_copy, cli):
    _edit(built_copy, lambda m: m["model"].update(n_head=8, head_dim=8))
    line = _one_error(cli("run", built_copy, "-p", "Hello", "-n", "2", "--variant", "fp32"), 2)
    assert "model.n_head says 8" in line or "does not describe this graph" in line


# -- 3. bounded resources -----------------------------------------------------------------------------
def test_threads_are_bounded(built_package, cli):
    from gpt2deploy.bounds import max_threads

    for n in (0, -1, max_threads() + 1, 10000):
        _one_error(cli("run", built_package, "-p", "Hi", "-n", "1", "--threads", n), 2, "threads must be")
    r = cli("run", built_package, "-p", "Hi", "-n", "1", "--threads", max_threads())
    assert r.exit_code == 0, r.output


def test_bench_batch_beyond_memory_is_refused_up_front(built_package, cli):
    t0 = time.monotonic()
    args = ["--batch", 100000, "--prompt-tokens", 8, "--new-tokens", 8, "--no-long-context"]
    _one_error(cli("bench", built_package, *args), 2, "memory available", "lower the batch size")
    assert time.monotonic() - t0 < 30


def test_generation_memory_estimate(built_package):
    from gpt2deploy.bounds import available_memory, generation_bytes

    model = gpt2deploy.load(built_package, variant="fp32")
    d = model.dims
    one = generation_bytes(d, 1, 8, 16)
    assert generation_bytes(d, 2, 8, 16) == 2 * one and generation_bytes(d, 1, 8, 32) > one
    assert generation_bytes(d, 1, 16, 64, logits_rows=1) < generation_bytes(d, 1, 16, 64)
    rows = max(1, int(1.5 * available_memory() / generation_bytes(d, 1, 16, 64, logits_rows=1)))
    with pytest.raises(GenerationError, match="lower the batch size"):
        model.generate_ids([[5] * 16] * rows, max_new_tokens=48)


@pytest.mark.timeout(300)
def test_ctrl_c_stops_run_within_a_second(built_package):
    """SIGINT while generating (or while the prompt is read from stdin): stopped within a second, one line.

    "Stopped" is the ``error: interrupted`` line on stderr; the interpreter's exit after it is allowed longer
    (thread pools and modules are torn down, slowly on a loaded machine)."""
    import threading

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "from gpt2deploy.cli import main; main()"
    base = [sys.executable, "-c", code, "run", str(built_package), "-n", "120", "--ignore-eos", "--variant", "fp32"]
    for extra, wait_for_output in ((["-p", "Hello", "--threads", "4"], True), (["-p", "-"], False)):
        proc = subprocess.Popen(
            base + extra, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        lines: list[tuple[float, bytes]] = []
        reader = threading.Thread(target=lambda p=proc, out=lines: out.extend((time.monotonic(), x) for x in p.stderr))
        reader.start()
        try:
            if wait_for_output:
                assert proc.stdout.read(1)  # generating
            else:
                time.sleep(3)  # blocked reading stdin
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            proc.stdout.read()
            proc.wait(timeout=60)
            reader.join(timeout=60)
        finally:
            proc.kill()
        err = b"".join(x for _, x in lines)
        assert b"Traceback" not in err, (extra, err)
        if proc.returncode == 0:  # the generation had finished before the signal arrived
            continue
        stopped = [t for t, x in lines if x.startswith(b"error: interrupted")]
        assert proc.returncode == 130 and len(stopped) == 1 and err.count(b"error:") == 1, (extra, err)
        assert stopped[0] - t0 < 1.5, (extra, stopped[0] - t0)  # one second, plus slack for a loaded machine


# -- 4. text ------------------------------------------------------------------------------------------
def test_lone_surrogates_and_invalid_utf8(built_package, cli):
    model = gpt2deploy.load(built_package, variant="fp32")
    with pytest.raises(UsageError, match="prompt is not valid Unicode"):
        model.generate("a\ud800b", max_new_tokens=2)
    with pytest.raises(UsageError, match="stop string is not valid Unicode"):
        model.generate("ab", max_new_tokens=2, stop=["\udcff"])
    _one_error(cli("run", built_package, "-p", "a\ud800b", "-n", "2"), 2, "--prompt is not valid Unicode")
    r = cli("run", built_package, "-p", "-", "-n", "2", input=b"caf\xc3\xa9 \xff\xfe end\n")
    assert r.exit_code == 0, r.output
    assert "warning: the prompt on stdin is not valid UTF-8; 2 invalid sequence(s) replaced" in r.stderr


# -- 5. API argument types ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, kwargs, needle",
    [
        ((123,), {}, "prompt_or_prompts must be a string"),
        ((None,), {}, "prompt_or_prompts must be a string"),
        (("a",), {"stop": 5}, "stop must be a string"),
        (("a",), {"eos_token_id": 10**30}, "eos_token_id"),
        (("a",), {"eos_token_id": -1}, "eos_token_id -1 is outside the vocabulary"),
        (("a",), {"truncate": "no"}, "truncate must be True or False"),
        (("a",), {"do_sample": "yes"}, "do_sample must be True or False"),
        (("a",), {"temperature": float("inf"), "do_sample": True}, "temperature must be a finite number"),
        (("a",), {"repetition_penalty": float("nan")}, "repetition_penalty must be a finite number"),
        (("a",), {"max_new_tokens": "3"}, "max_new_tokens must be a number"),
    ],
)
def test_api_arguments_are_type_checked(built_package, args, kwargs, needle):
    model = gpt2deploy.load(built_package, variant="fp32")
    with pytest.raises(UsageError, match=needle):
        model.generate(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"path": None}, "path must be a package directory"),
        ({"threads": "2"}, "threads must be an integer"),
        ({"threads": 0}, "threads must be >= 1 and <= "),
        ({"variant": 8}, "variant must be a variant name"),
        ({"device": None}, "device must be one of"),
        ({"verify": "yes"}, "verify must be True or False"),
    ],
)
def test_load_arguments_are_type_checked(built_package, kwargs, needle):
    kwargs = {"path": built_package, **kwargs}
    with pytest.raises(UsageError, match=needle) as e:
        gpt2deploy.load(**kwargs)
    assert "rebuild the package" not in str(e.value)  # the caller's mistake, not the package's


# -- 7. smaller items ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "PKG", "-p", "x", "-n", "abc"], "Invalid value for '--max-new-tokens'"),
        (["run", "PKG", "-p", "x", "--bogus"], "No such option: --bogus"),
        (["nosuchcommand"], "No such command"),
        (["run", "PKG", "-p", "x", "--temperature", "inf", "--do-sample"], "temperature must be a finite number"),
        (["run", "PKG", "-p", "x", "--repetition-penalty", "inf"], "repetition_penalty must be a finite number"),
    ],
)
def test_usage_errors_are_one_line(built_package, cli, args, needle):
    r = cli(*[built_package if a == "PKG" else a for a in args])
    line = _one_error(r, 2, needle)
    assert len([x for x in r.stderr.splitlines() if x.strip()]) == 1, r.stderr
    if "Invalid" in needle or "No such" in needle:
        assert "--help" in line


def test_json_into_a_closed_pipe_exits_0(built_package):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "from gpt2deploy.cli import main; main()"
    for extra in (["--json"], []):
        r, w = os.pipe()
        os.close(r)  # the reader is gone before anything is written
        p = subprocess.run(
            [sys.executable, "-c", code, "run", str(built_package), "-p", "Hi", "-n", "3", *extra],
            stdout=w,
            stderr=subprocess.PIPE,
            env=env,
            timeout=120,
        )
        os.close(w)
        assert p.returncode == 0 and b"error" not in p.stderr and b"Traceback" not in p.stderr, (extra, p.stderr)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"n_head": 5}, "n_head 5 does not divide n_embd 64"),
        ({"n_positions": 0}, "n_positions is 0, not an integer in 1.."),
        ({"n_layer": "2"}, "n_layer is '2'"),
    ],
)
def test_inconsistent_checkpoint_config(tiny_checkpoint, tmp_path, cli, change, needle):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, **change}))
    line = _one_error(cli("export", ckpt, "-o", tmp_path / "a" / "b" / "out"), 2, needle)
    assert "corrupt" not in line and not (tmp_path / "a").exists()


def test_nan_checkpoint_refused_without_leaving_a_directory(tmp_path, cli):
    from conftest import SHAPE_A, make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt", **{**SHAPE_A, "n_layer": 1})
    from safetensors.numpy import load_file, save_file

    tensors = {k: v.copy() for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    name = sorted(k for k in tensors if k.endswith("ln_f.weight"))[0]
    tensors[name][0] = float("nan")
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    line = _one_error(cli("export", ckpt, "-o", tmp_path / "new" / "pkg"), 2, "NaN or Inf", name.split(".")[-2])
    assert "report this checkpoint" not in line and not (tmp_path / "new").exists()


def test_export_atol_refused_before_work(tiny_checkpoint, tmp_path, cli):
    for bad in ("-1", "0", "nan", "inf"):
        t0 = time.monotonic()
        _one_error(cli("export", tiny_checkpoint, "-o", tmp_path / "o", "--atol", bad), 2, "--atol")
        assert time.monotonic() - t0 < 5 and not (tmp_path / "o").exists()


def test_read_only_package_refused_before_quantize(package_copy, cli, monkeypatch):
    import gpt2deploy.fsutil as fsutil

    real = fsutil.tempfile.mkstemp

    def read_only(*a, dir=None, **k):  # as on a read-only mount: no file can be created in the package
        if dir is not None and Path(dir).resolve().is_relative_to(package_copy.resolve()):
            raise OSError(30, "Read-only file system")
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(fsutil.tempfile, "mkstemp", read_only)
    before = (package_copy / "manifest.json").read_bytes()
    t0 = time.monotonic()
    _one_error(cli("quantize", package_copy, "--mode", "int8"), 2, "Read-only file system", "work on a copy")
    assert time.monotonic() - t0 < 10 and (package_copy / "manifest.json").read_bytes() == before
    assert not (package_copy / "onnx" / "model_int8.onnx").exists()


# -- 6. the accuracy gate says which CPU kind measured it --------------------------------------------
def test_accuracy_records_the_cpu_kind(built_package, cli):
    from gpt2deploy.cpuinfo import cpu_kind

    acc = Package.open(built_package).variant("int8")["accuracy"]
    assert acc["measured_on"] == cpu_kind() and acc["measured_on"]["kind"] in ("vnni", "avx512", "avx2", "arm") + (
        acc["measured_on"]["arch"],
    )
    r = cli("inspect", built_package, "--json")
    assert json.loads(r.stdout)["variants"]["int8"]["accuracy"]["measured_on"] == acc["measured_on"]
