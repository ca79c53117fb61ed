"""triton: model repository layout, config.pbtxt parsed and matched to the manifest and the graph itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from conftest import assert_cli_error

from gpt2deploy.fsutil import sha256_file
from gpt2deploy.manifest import load_manifest

# -- a small protobuf text-format parser (enough for Triton model configs) -----------------------
_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([A-Za-z_][\w.]*)|(-?\d+(?:\.\d+)?)|([{}\[\]:,]))')


def _tokens(text: str) -> list:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        assert m and m.end() > pos, f"cannot parse config at {text[pos : pos + 30]!r}"
        pos = m.end()
        comment, string, ident, number, punct = m.groups()
        if comment:
            continue
        out.append(
            ("str", json.loads(string))
            if string
            else ("id", ident)
            if ident
            else ("num", int(number))
            if number
            else ("p", punct)
        )
    return out


def parse_pbtxt(text: str) -> dict:
    """Fields -> values; repeated fields (``name [ ... ]`` or repeated keys) -> lists; messages -> dicts."""
    toks = _tokens(text)
    i = 0

    def value():
        nonlocal i
        kind, v = toks[i]
        if (kind, v) == ("p", "{"):
            i += 1
            return message("}")
        if (kind, v) == ("p", "["):
            i += 1
            items = []
            while toks[i] != ("p", "]"):
                items.append(value())
                if toks[i] == ("p", ","):
                    i += 1
            i += 1
            return items
        i += 1
        return v

    def message(end):
        nonlocal i
        fields: dict = {}
        while i < len(toks) and toks[i] != ("p", end):
            kind, key = toks[i]
            assert kind == "id", toks[i]
            i += 1
            if toks[i] == ("p", ":"):
                i += 1
            v = value()
            if key in fields:
                fields[key] = (fields[key] if isinstance(fields[key], list) else [fields[key]]) + (
                    v if isinstance(v, list) else [v]
                )
            else:
                fields[key] = v
        i += 1
        return fields

    return message(None)


def test_parser_on_known_text():
    cfg = parse_pbtxt(
        '# c\nname: "m"\nmax_batch_size: 0\ninput [ { name: "a" dims: [ -1, 4 ] }, { name: "b" dims: [ 2 ] } ]\n'
        'parameters { key: "k" value: { string_value: "2" } }\n'
    )
    assert cfg == {
        "name": "m",
        "max_batch_size": 0,
        "input": [{"name": "a", "dims": [-1, 4]}, {"name": "b", "dims": [2]}],
        "parameters": {"key": "k", "value": {"string_value": "2"}},
    }


_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64", "float16": "TYPE_FP16"}
_ORT = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64", "tensor(float16)": "TYPE_FP16"}


def _check_model_dir(model_dir: Path, name: str, variant: str, pkg: Path, kind: str = "KIND_CPU") -> dict:
    manifest = load_manifest(pkg)
    entry = manifest["variants"][variant]
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt"]
    version = model_dir / "1"
    files = sorted(p.name for p in version.iterdir())
    assert (
        "model.onnx" in files
        and "tokenizer.json" in files
        and "manifest.json" in files
        and "generation_config.json" in files
    )
    assert sha256_file(version / "model.onnx") == entry["files"][0]["sha256"]
    for f in entry["files"][1:]:
        assert sha256_file(version / Path(f["path"]).name) == f["sha256"]
    assert (version / "manifest.json").read_bytes() == (pkg / "manifest.json").read_bytes()
    assert (version / "tokenizer.json").read_bytes() == (pkg / "tokenizer.json").read_bytes()

    cfg = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    assert cfg["name"] == name == model_dir.name
    assert cfg["platform"] == "onnxruntime_onnx" and cfg["max_batch_size"] == 0
    assert cfg["instance_group"] == [{"count": 1, "kind": kind}]
    contract = manifest["io"]
    for key in ("input", "output"):
        want = [
            (t["name"], _TYPES[t["dtype"]], [d if isinstance(d, int) else -1 for d in t["shape"]])
            for t in contract[key + "s"]
        ]
        got = [(t["name"], t["data_type"], t["dims"]) for t in cfg[key]]
        assert got == want

    # Triton's ONNX Runtime backend checks the config against the graph: do the same, then run one step
    import onnxruntime as ort

    sess = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    for key, args in (("input", sess.get_inputs()), ("output", sess.get_outputs())):
        by_name = {t["name"]: t for t in cfg[key]}
        assert set(by_name) == {a.name for a in args}
        for a in args:
            t = by_name[a.name]
            assert _ORT[a.type] == t["data_type"] and len(a.shape) == len(t["dims"])
            for g, c in zip(a.shape, t["dims"], strict=False):
                assert c == -1 or g == c, (a.name, a.shape, t["dims"])
    feed = {}
    for t in cfg["input"]:
        dims = [d if d != -1 else 0 for d in t["dims"]]
        if t["name"] in ("input_ids", "position_ids"):
            feed[t["name"]] = (
                np.array([[464, 2068, 7586]], np.int64) if t["name"] == "input_ids" else np.arange(3)[None]
            )
        elif t["name"] == "attention_mask":
            feed[t["name"]] = np.ones((1, 3), np.int64)
        else:
            dims[0] = 1
            feed[t["name"]] = np.zeros(dims, np.float32)
    logits = sess.run(["logits"], feed)[0]
    assert logits.shape == (1, 3, manifest["model"]["vocab_size"]) and np.isfinite(logits).all()
    return cfg


def test_triton_repository_for_int8(built_package, tmp_path, cli):
    repo = tmp_path / "repo"
    r = cli("triton", built_package, "-o", repo, "--variant", "int8", "--name", "gpt2_int8")
    assert r.exit_code == 0, r.output
    assert "tritonserver --model-repository=" in r.stdout
    _check_model_dir(repo / "gpt2_int8", "gpt2_int8", "int8", built_package)


def test_triton_default_variant_name_and_gpu(built_copy, tmp_path, cli):
    built_package = built_copy
    from gpt2deploy.runtime.select import select_variant

    repo = tmp_path / "repo"
    (repo / "other_model" / "1").mkdir(parents=True)
    (repo / "other_model" / "config.pbtxt").write_text('name: "other_model"')
    cpu_pick, _ = select_variant(load_manifest(built_package), "cpu")
    r = cli("triton", built_package, "-o", repo)
    assert r.exit_code == 0, r.output
    model = next(p for p in repo.iterdir() if p.name != "other_model")
    assert model.name == f"model_{cpu_pick}"  # the checkpoint directory is named 'model'
    _check_model_dir(model, model.name, cpu_pick, built_package)

    # the built variants take the in-place KV cache (CPU only): a CUDA-capable int4 is added for the GPU model
    bad = cli("triton", built_package, "-o", tmp_path / "nothing", "--device", "cuda")
    assert bad.exit_code != 0 and "not built for cuda" in bad.stderr
    assert cli("quantize", built_package, "--mode", "int4", "--attention", "mha", "--force").exit_code == 0
    gpu_pick, _ = select_variant(load_manifest(built_package), "cuda")
    assert gpu_pick == "int4"
    r = cli(
        "triton",
        built_package,
        "-o",
        repo,
        "--device",
        "cuda",
        "--name",
        "gpt2_gpu",
        "--instances",
        "2",
        "--threads",
        "3",
    )
    assert r.exit_code == 0, r.output
    cfg = parse_pbtxt((repo / "gpt2_gpu" / "config.pbtxt").read_text())
    assert cfg["instance_group"] == [{"count": 2, "kind": "KIND_GPU"}]
    assert cfg["parameters"] == {"key": "intra_op_thread_count", "value": {"string_value": "3"}}
    assert (
        sha256_file(repo / "gpt2_gpu" / "1" / "model.onnx")
        == load_manifest(built_package)["variants"][gpu_pick]["files"][0]["sha256"]
    )
    assert (repo / "other_model" / "config.pbtxt").read_text() == 'name: "other_model"'  # other models untouched
    assert sorted(p.name for p in repo.iterdir()) == sorted(["other_model", model.name, "gpt2_gpu"])


def test_triton_external_data_keeps_its_name(built_copy, tmp_path, cli):
    import onnx

    from gpt2deploy.manifest import file_entry

    graph = built_copy / "onnx" / "model.onnx"
    onnx.save_model(
        onnx.load(str(graph)), str(graph), save_as_external_data=True, location="model.onnx.data", size_threshold=1024
    )
    m = json.loads((built_copy / "manifest.json").read_text())
    files = [file_entry(built_copy, "onnx/model.onnx"), file_entry(built_copy, "onnx/model.onnx.data")]
    m["variants"]["fp32"].update(files=files, size=sum(f["size"] for f in files))
    (built_copy / "manifest.json").write_text(json.dumps(m))
    repo = tmp_path / "repo"
    r = cli("triton", built_copy, "-o", repo, "--variant", "fp32")
    assert r.exit_code == 0, r.output
    assert (repo / "model_fp32" / "1" / "model.onnx.data").is_file()
    _check_model_dir(repo / "model_fp32", "model_fp32", "fp32", built_copy)


# -- bad input: one line, nonzero exit, nothing written -------------------------------------------


def _clean_failure(r, *needles, code=2):
    assert_cli_error(r, *needles, code=code)


def test_triton_existing_model_needs_force(built_package, tmp_path, cli):
    repo = tmp_path / "repo"
    assert cli("triton", built_package, "-o", repo, "--variant", "fp32", "--name", "m").exit_code == 0
    (repo / "m" / "config.pbtxt").write_text("mine")
    _clean_failure(cli("triton", built_package, "-o", repo, "--variant", "int4", "--name", "m"), "--force")
    assert (repo / "m" / "config.pbtxt").read_text() == "mine"
    assert cli("triton", built_package, "-o", repo, "--variant", "int4", "--name", "m", "--force").exit_code == 0
    _check_model_dir(repo / "m", "m", "int4", built_package)
    assert sorted(p.name for p in repo.iterdir()) == ["m"]  # no staging leftovers


def test_triton_bad_input(built_copy, tmp_path, cli):
    repo = tmp_path / "repo"
    _clean_failure(
        cli("triton", built_copy, "-o", repo, "--variant", "int3"),
        "variant 'int3' is not in package",
        "fp32, int4, int8",
    )
    _clean_failure(cli("triton", built_copy, "-o", repo, "--device", "tpu"), "unknown device 'tpu'")
    _clean_failure(
        cli("triton", built_copy, "-o", repo, "--name", "../escape"), "not a valid Triton model directory name"
    )
    _clean_failure(cli("triton", built_copy, "-o", built_copy / "repo"), "must be outside the package")
    (tmp_path / "afile").write_text("x")
    _clean_failure(cli("triton", built_copy, "-o", tmp_path / "afile"), "is a file")
    data = bytearray((built_copy / "onnx" / "model_int8.onnx").read_bytes())
    data[100] ^= 1
    (built_copy / "onnx" / "model_int8.onnx").write_bytes(bytes(data))
    _clean_failure(
        cli("triton", built_copy, "-o", repo, "--variant", "int8"), "model_int8.onnx: sha256 differs", code=1
    )
    assert not repo.exists() and not (built_copy / "repo").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "built"]
