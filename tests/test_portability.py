"""Runtime requirements per variant, and a default build that runs on the floor onnxruntime, onnxruntime-gpu's
CPU execution provider and onnxruntime-node (the runtimes the README's compatibility table lists)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import BUILD_TOKENS, RANDOM_MODEL_GATES
from runtime_envs import FLOOR, GPU, node_greedy, run_greedy, runtime_python

import gpt2deploy
from gpt2deploy.errors import VariantError
from gpt2deploy.manifest import VARIANT_FILES, file_entry
from gpt2deploy.runtime.model import PerformanceWarning

PROMPTS = [[464, 2068, 7586, 21831, 18045], [818, 11361, 11, 257]]
NEW = 8


@pytest.fixture(scope="session")
def portable_package(tmp_path_factory, tiny_checkpoint):
    """A default build for CPU and CUDA (fp32, int8, int4, fp16) of shape A. Read-only."""
    from gpt2deploy.building import build_package

    out = tmp_path_factory.mktemp("portable") / "pkg"
    build_package(str(tiny_checkpoint), out, target="cpu,cuda", max_tokens=BUILD_TOKENS, thresholds=RANDOM_MODEL_GATES)
    return out


@pytest.fixture(scope="session")
def main_tokens(portable_package):
    """Greedy tokens of every variant in this (the main) environment."""
    out = {}
    for name in ("fp32", "int8", "int4", "fp16"):
        if name == "fp16":  # a CUDA variant asked for by name on the CPU: it runs, with a PerformanceWarning
            with pytest.warns(PerformanceWarning):
                model = gpt2deploy.load(portable_package, variant=name, device="cpu")
        else:
            model = gpt2deploy.load(portable_package, variant=name, device="cpu")
        result = model.generate_ids(PROMPTS, max_new_tokens=NEW, do_sample=False, ignore_eos=True)
        out[name] = [list(map(int, t)) for t in result.tokens]
    return out


def _gqa_input_counts(path) -> set[int]:
    model = onnx.load(str(path), load_external_data=False)
    return {len(n.input) for n in model.graph.node if n.op_type == "GroupQueryAttention"}


@pytest.mark.timeout(900)
def test_default_build_records_requirements(portable_package):
    m = json.loads((portable_package / "manifest.json").read_text())
    assert set(m["variants"]) == {"fp32", "int8", "int4", "fp16"}  # --target cpu,cuda adds fp16
    for name, entry in m["variants"].items():
        assert entry["requires"] == {"onnxruntime": "1.22"}, name
    for name in ("fp32", "int8", "int4"):
        counts = _gqa_input_counts(portable_package / VARIANT_FILES[name])
        assert counts and max(counts) <= 11, (name, counts)  # the 1.22 schema: attention_bias is input 10
    assert "CUDAExecutionProvider" in m["variants"]["fp16"]["providers"]


def test_requirement_from_input_counts():
    from onnx import helper

    from quant.requirements import FLOOR as REQ_FLOOR
    from quant.requirements import requirement

    def graph(n_inputs, op="GroupQueryAttention", domain="com.microsoft"):
        node = helper.make_node(op, [f"x{i}" for i in range(n_inputs)], ["y"], domain=domain)
        g = helper.make_graph([node], "g", [], [])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)

    assert requirement(graph(11))["onnxruntime"] == REQ_FLOOR == "1.22"
    assert requirement(graph(12))["onnxruntime"] == "1.23"
    assert requirement(graph(17))["onnxruntime"] == "1.32"
    assert requirement(graph(2, "Relu", ""))["onnxruntime"] == "1.22"
    # an op the table does not know: the release that wrote the graph
    assert requirement(graph(1, "NoSuchOp"), writer="1.32.0")["onnxruntime"] == "1.32"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("runtime", [FLOOR, GPU], ids=["floor", "gpu-cpu-ep"])
def test_other_runtimes_give_same_greedy_tokens(runtime, portable_package, main_tokens):
    python = runtime_python(*runtime)
    for name in ("fp32", "int8", "int4", "fp16"):
        got = run_greedy(python, portable_package, name, PROMPTS, NEW)
        assert "error" not in got, (runtime, name, got)
        assert got["onnxruntime"].startswith(runtime[1]), got
        assert got["heavy_imports"] == []
        assert got["tokens"] == main_tokens[name], (runtime, name)
    auto = run_greedy(python, portable_package, "auto", PROMPTS, NEW)
    assert auto["variant"] == "int4" and auto["tokens"] == main_tokens["int4"], auto


@pytest.mark.timeout(900)
def test_onnxruntime_node_opens_every_standard_graph(portable_package, main_tokens):
    if shutil.which("node") is None:
        pytest.fail("node is not installed; install Node.js 20 (apt-get install nodejs npm)")
    graphs = sorted(p.relative_to(portable_package).as_posix() for p in (portable_package / "onnx").glob("model*.onnx"))
    by_file = {f: n for n, f in VARIANT_FILES.items()}
    assert set(graphs) == {VARIANT_FILES[n] for n in ("fp32", "int8", "int4", "fp16")}
    for graph in graphs:
        for row, prompt in enumerate(PROMPTS):
            got = node_greedy(portable_package, graph, prompt, NEW)
            assert "error" not in got, (graph, got)
            assert got["version"] == "1.30.0"
            # the Optimum contract: present = past + new positions at every step
            lengths = [s[2] for s in got["present_shapes"]]
            assert lengths == [len(prompt) + k for k in range(NEW)], (graph, lengths)
            assert got["tokens"] == main_tokens[by_file[graph]][row], (graph, row)


def _with_requirement(src, dst, variant, version):
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["variants"][variant]["requires"] = {"onnxruntime": version}
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.mark.timeout(900)
def test_variant_needing_newer_runtime(portable_package, tmp_path, cli):
    pkg = _with_requirement(portable_package, tmp_path / "pkg", "int4", "99.1")
    with pytest.raises(VariantError) as e:
        gpt2deploy.load(pkg, variant="int4", device="cpu")
    msg = str(e.value)
    assert "needs onnxruntime >= 99.1" in msg and "is installed" in msg and "--variant fp32" in msg
    assert "\n" not in msg
    model = gpt2deploy.load(pkg, device="cpu")  # auto selection skips it and says so
    assert model.variant == "int8"
    assert "int4 needs onnxruntime >= 99.1" in model.selection_reason
    r = cli("run", pkg, "--variant", "int4", "--prompt", "Hello", "--max-new-tokens", "2")
    assert r.exit_code == 2 and "needs onnxruntime >= 99.1" in r.output and "Traceback" not in r.output
    text = cli("inspect", pkg).output
    assert "ort>=99.1" in text and "int4 needs onnxruntime >= 99.1" in text and "ort>=1.22" in text


@pytest.mark.timeout(900)
def test_graph_with_op_the_runtime_lacks(portable_package, tmp_path):
    """A package without the field (written before it existed) whose graph uses an op form no release has."""
    pkg = tmp_path / "pkg"
    shutil.copytree(portable_package, pkg)
    m = json.loads((pkg / "manifest.json").read_text())
    for entry in m["variants"].values():
        entry.pop("requires")
    (pkg / "manifest.json").write_text(json.dumps(m))
    path = pkg / VARIANT_FILES["fp32"]
    model = onnx.load(str(path), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    node.input.extend([""] * (40 - len(node.input)) + [node.input[0]])
    onnx.save(model, str(path))
    with pytest.raises(VariantError) as e:
        gpt2deploy.load(pkg, variant="fp32", device="cpu", verify=False)
    msg = str(e.value)
    assert "GroupQueryAttention" in msg and "upgrade onnxruntime" in msg and "\n" not in msg


@pytest.mark.timeout(900)
def test_verify_checks_requires(portable_package, tmp_path):
    from gpt2deploy.verify import verify_package

    assert verify_package(portable_package).ok
    bad = _with_requirement(portable_package, tmp_path / "bad", "int8", "soon")
    problems = verify_package(bad).problems
    assert any("requires" in p and "int8" in p and "'soon'" in p for p in problems), problems
    low = _with_requirement(portable_package, tmp_path / "low", "fp32", "1.22")
    path = low / VARIANT_FILES["fp32"]
    model = onnx.load(str(path), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    node.input.extend([""] * (16 - len(node.input)) + [node.input[0]])  # 17 inputs: a 1.32 graph
    onnx.save(model, str(path))
    m = json.loads((low / "manifest.json").read_text())  # the files match: only the requirement is stale
    m["variants"]["fp32"]["files"][0] = file_entry(low, VARIANT_FILES["fp32"])
    m["variants"]["fp32"]["size"] = sum(f["size"] for f in m["variants"]["fp32"]["files"])
    (low / "manifest.json").write_text(json.dumps(m))
    problems = verify_package(low).problems
    assert any("needs onnxruntime >= 1.22 but its graph needs >= 1.32" in p for p in problems), problems


def test_old_packages_without_the_field_still_load(built_copy):
    m = json.loads((built_copy / "manifest.json").read_text())
    for entry in m["variants"].values():
        entry.pop("requires", None)
    (built_copy / "manifest.json").write_text(json.dumps(m))
    model = gpt2deploy.load(built_copy, device="cpu")
    assert model.variant == "int4"
    assert np.asarray(model.generate_ids([[464, 2068]], max_new_tokens=2).tokens).shape == (1, 2)


def test_build_target_bad_input(tiny_checkpoint, tmp_path, cli):
    r = cli("build", tiny_checkpoint, "-o", tmp_path / "out", "--target", "tpu")
    assert r.exit_code == 2 and "unknown --target 'tpu'" in r.output
    assert not (tmp_path / "out").exists()
