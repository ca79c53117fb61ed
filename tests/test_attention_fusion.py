"""Attention fusion: every layer becomes one contrib attention op, the I/O contract is unchanged and the
logits match the unfused graph (prompt, decode with past, multi-token steps with past, left-padded batch)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import EVAL_TEXT, GPT2_REF, TOKENIZER_DIR, requires_gpt2_ref

from quant import QuantError
from quant.attention import GQA, MHA, fuse_attention

TOL = 1e-4


def _ort_optimized(model: onnx.ModelProto, num_heads: int, hidden: int) -> onnx.ModelProto:
    from onnxruntime.transformers.optimizer import optimize_model

    return optimize_model(model, model_type="gpt2", num_heads=num_heads, hidden_size=hidden, opt_level=0).model


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


class Graphs:
    """One exported decoder: its raw and ORT-optimized graphs, and fused versions made on demand."""

    def __init__(self, model: onnx.ModelProto, n_layer: int, n_head: int, hidden: int):
        self.raw = model
        self.n_layer, self.n_head, self.hidden = n_layer, n_head, hidden
        self.head_dim = hidden // n_head
        self.optimized = _ort_optimized(model, n_head, hidden)
        self._fused: dict = {}
        self._sessions: dict = {}

    def fused(self, stage: str = "optimized", op: str = MHA):
        key = (stage, op)
        if key not in self._fused:
            self._fused[key] = fuse_attention(getattr(self, stage), self.n_head, self.hidden, op=op)
        return self._fused[key]

    def session(self, stage: str, op: str | None):
        key = (stage, op)
        if key not in self._sessions:
            model = getattr(self, stage) if op is None else self.fused(stage, op)[0]
            self._sessions[key] = _session(model)
        return self._sessions[key]

    def empty_past(self, batch: int):
        return [np.zeros((batch, self.n_head, 0, self.head_dim), np.float32) for _ in range(2 * self.n_layer)]

    def step(self, sess, ids, mask, past):
        pos = np.cumsum(mask, axis=1) - 1
        pos[mask == 0] = 0
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos[:, -ids.shape[1] :].astype(np.int64)}
        for i in range(self.n_layer):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        out = sess.run(None, feed)
        return out[0], out[1:]


def _graphs_from_package(package) -> Graphs:
    from gpt2deploy.package import Package

    pkg = Package.open(package)
    d = pkg.dims
    return Graphs(onnx.load(str(pkg.variant_path("fp32"))), d.n_layer, d.n_head, d.hidden_size)


@pytest.fixture(scope="module")
def graphs_a(tiny_portable_package) -> Graphs:
    return _graphs_from_package(tiny_portable_package)


@pytest.fixture(scope="module")
def graphs_b(tmp_path_factory, tiny_checkpoint_b) -> Graphs:
    """Shape B (3 layers, 6 heads of 8) exported straight to ONNX, without a package."""
    from transformers import GPT2LMHeadModel

    from exporters.onnx_export import export_onnx

    model = GPT2LMHeadModel.from_pretrained(str(tiny_checkpoint_b)).eval()
    path = tmp_path_factory.mktemp("attn_b") / "model.onnx"
    export_onnx(model, path)
    c = model.config
    return Graphs(onnx.load(str(path)), c.n_layer, c.n_head, c.n_embd)


def _io(model: onnx.ModelProto):
    return [vi.SerializeToString() for vi in model.graph.input], [vi.SerializeToString() for vi in model.graph.output]


def _real_rows(x: np.ndarray, mask_tail: np.ndarray) -> np.ndarray:
    """Positions of real (unpadded) tokens of a [batch, seq, ...] array."""
    return x[mask_tail.astype(bool)]


def _compare_run(g: Graphs, stage: str, op: str, ids: np.ndarray, mask: np.ndarray, steps: int = 3, chunk: int = 3):
    """Prompt (past 0), ``steps`` single-token decode steps and one multi-token step with past."""
    ref, fus = g.session(stage, None), g.session(stage, op)
    rng = np.random.default_rng(0)
    batch, seq = ids.shape
    la, pa = g.step(ref, ids, mask, g.empty_past(batch))
    lb, pb = g.step(fus, ids, mask, g.empty_past(batch))
    assert np.abs(_real_rows(la, mask) - _real_rows(lb, mask)).max() <= TOL
    for x, y in zip(pa, pb, strict=False):  # present KV at real positions
        assert x.shape == y.shape
        assert (
            np.abs(_real_rows(x.transpose(0, 2, 1, 3), mask) - _real_rows(y.transpose(0, 2, 1, 3), mask)).max() <= TOL
        )
    # GroupQueryAttention in the portable (1.22) input schema takes multi-token steps with past for batch 1 only
    multi = [chunk] if op != GQA or batch == 1 else []
    for n_new in [1] * steps + multi:
        new = rng.integers(0, 1000, (batch, n_new)).astype(np.int64)
        mask = np.concatenate([mask, np.ones((batch, n_new), np.int64)], axis=1)
        la, pa = g.step(ref, new, mask, pa)
        lb, pb = g.step(fus, new, mask, pb)
        assert np.abs(la - lb).max() <= TOL, f"step of {n_new} tokens at past {mask.shape[1] - n_new}"
        assert [p.shape for p in pa] == [p.shape for p in pb]


# ------------------------------------------------------------------------------------ structure


@pytest.mark.parametrize("stage", ["raw", "optimized"])
def test_every_layer_fused_and_contract_kept(graphs_a, stage):
    g = graphs_a
    src = getattr(g, stage)
    before = src.SerializeToString()
    fused, report = g.fused(stage)
    assert src.SerializeToString() == before, "the input model must not be modified"
    assert report["fused"] == g.n_layer and report["op"] == MHA and report["unmatched"] == []
    assert report["nodes_after"] < report["nodes_before"]
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["MultiHeadAttention"] == g.n_layer
    for gone in ("Softmax", "IsNaN"):
        assert ops[gone] == 0, gone
    # at most the lm_head's weight Transpose is left; no per-layer layout shuffles
    assert ops["Transpose"] <= 1
    assert _io(fused) == _io(src)
    assert any(o.domain == "com.microsoft" for o in fused.opset_import)
    onnx.checker.check_model(fused)


def test_shape_b_and_gqa_structure(graphs_b):
    for op in (MHA, GQA):
        fused, report = graphs_b.fused("optimized", op)
        assert report["fused"] == 3 and report["op"] == op
        assert Counter(n.op_type for n in fused.graph.node)[op] == 3
        assert _io(fused) == _io(graphs_b.optimized)


def test_mask_bias_fill_is_finite_in_half_precision(graphs_a):
    """The fused ops get the graph's mask with its fill raised to -10000 (float32 min is -inf in fp16)."""
    from quant.graph import GraphIndex

    fused, _ = graphs_a.fused("optimized")
    index = GraphIndex(fused.graph)
    biases = {n.input[5] for n in fused.graph.node if n.op_type == "MultiHeadAttention"}
    assert len(biases) == 1  # built once, shared by every layer
    where = index.producer[biases.pop()]
    assert where.op_type == "Where"
    fills = [index.value(x) for x in where.input[1:]]
    assert all(f is not None and f.min() >= -10000.0 for f in fills)


def test_optimize_pipeline_fuses_attention_by_default(graphs_a):
    from quant.attention import ragged_rows
    from quant.optimize import optimize

    model, report = optimize(graphs_a.raw, graphs_a.n_head, graphs_a.hidden)
    assert report.fused.get("GroupQueryAttention") == graphs_a.n_layer
    assert report.steps["attention"]["fused"] == graphs_a.n_layer
    assert report.kv_cache == "shared"
    assert ragged_rows(model)  # each row's length from its mask's last 1: rows of different lengths in a step
    assert _io(model) == _io(graphs_a.raw)
    mha, report = optimize(graphs_a.raw, graphs_a.n_head, graphs_a.hidden, attention_op=MHA)
    assert report.fused.get("MultiHeadAttention") == graphs_a.n_layer and report.kv_cache == "concat"
    assert not ragged_rows(mha) and not ragged_rows(graphs_a.raw)
    _, off = optimize(graphs_a.raw, graphs_a.n_head, graphs_a.hidden, fuse_attention=False)
    assert "MultiHeadAttention" not in off.fused and "attention" not in off.steps and off.kv_cache == "concat"


def test_optimize_is_idempotent_and_retargets(graphs_a):
    """Optimizing an optimized graph keeps it; asking for the other op swaps the fused nodes exactly."""
    from quant.attention import kv_cache_mode, ragged_rows, retarget
    from quant.optimize import optimize

    g = graphs_a
    once, _ = optimize(g.raw, g.n_head, g.hidden)
    twice, report = optimize(once, g.n_head, g.hidden)
    assert report.kv_cache == "shared" and report.fused["GroupQueryAttention"] == g.n_layer
    mha, report = optimize(once, g.n_head, g.hidden, attention_op=MHA)
    assert report.steps["attention"]["retargeted"] == g.n_layer and report.kv_cache == "concat"
    assert "GroupQueryAttention" not in Counter(n.op_type for n in mha.graph.node)
    # GroupQueryAttention reads the packed QKV projection (no Split); MultiHeadAttention gets the Split back
    for model in (once, twice):
        gqa = [n for n in model.graph.node if n.op_type == GQA]
        assert all(n.input[0] and not n.input[1] and not n.input[2] for n in gqa)
        assert "Split" not in Counter(n.op_type for n in model.graph.node)
    assert Counter(n.op_type for n in mha.graph.node)["Split"] == g.n_layer
    back, n = retarget(mha, GQA)
    assert n == g.n_layer and kv_cache_mode(back) == "shared" and ragged_rows(back)
    assert "Split" not in Counter(n.op_type for n in back.graph.node)
    ids = np.array([[5, 6, 7, 8], [0, 0, 9, 10]], np.int64)
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]], np.int64)
    ref = _session(g.raw).run(None, _feed(g, ids, mask))[0]
    for model in (twice, mha, back):
        out = _session(model).run(None, _feed(g, ids, mask))[0]
        assert np.abs(out[mask.astype(bool)] - ref[mask.astype(bool)]).max() <= TOL
    with pytest.raises(QuantError, match="unknown attention op"):
        retarget(mha, "Attention")


def _shared_run(g: Graphs, model, ids, mask, steps: int, capacity: int):
    """Prompt + single-token steps with ONE buffer per KV tensor bound as both past and present."""
    sess = _session(model)
    io = sess.io_binding()
    batch = ids.shape[0]
    arrays, values = [], []  # the OrtValues wrap the arrays' memory: keep both alive
    for i in range(g.n_layer):
        for kind in ("key", "value"):
            arrays.append(np.full((batch, g.n_head, capacity, g.head_dim), np.nan, np.float32))
            values.append(ort.OrtValue.ortvalue_from_numpy(arrays[-1]))
            io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", values[-1])
            io.bind_ortvalue_output(f"present.{i}.{kind}", values[-1])
    out = []
    new = ids
    for _ in range(steps + 1):
        pos = np.cumsum(mask, 1) - 1
        pos[mask == 0] = 0
        io.bind_cpu_input("input_ids", np.ascontiguousarray(new))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(mask))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(pos[:, -new.shape[1] :]))
        io.bind_output("logits")
        sess.run_with_iobinding(io)
        logits = io.get_outputs()[-1].numpy()[:, -1]
        out.append(logits)
        new = logits.argmax(-1).astype(np.int64).reshape(batch, 1)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    return np.stack(out, 1), arrays


def _concat_run(g: Graphs, model, ids, mask, steps: int):
    sess = _session(model)
    past = g.empty_past(ids.shape[0])
    out = []
    new = ids
    for _ in range(steps + 1):
        logits, past = g.step(sess, new, mask, past)
        out.append(logits[:, -1])
        new = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
        mask = np.concatenate([mask, np.ones_like(new)], axis=1)
    return np.stack(out, 1), past


@pytest.mark.parametrize("which", ["a", "b"])
def test_shared_kv_buffer_equals_concat(graphs_a, graphs_b, which):
    """A GroupQueryAttention graph fed one in-place buffer per KV tensor (capacity > length, NaN beyond
    the valid length) gives the plain graph's logits and caches, left-padded batch included."""
    from quant.optimize import optimize

    g = graphs_a if which == "a" else graphs_b
    model, report = optimize(g.raw, g.n_head, g.hidden)
    assert report.kv_cache == "shared"
    ids = np.random.default_rng(7).integers(0, 1000, (3, 6)).astype(np.int64)
    mask = np.ones((3, 6), np.int64)
    mask[1, :2] = 0
    mask[2, :5] = 0
    ref, ref_cache = _concat_run(g, g.raw, ids, mask, steps=6)
    got, bufs = _shared_run(g, model, ids, mask, steps=6, capacity=20)
    assert np.abs(ref - got).max() <= TOL
    length = ref_cache[0].shape[2]
    valid = np.concatenate([mask, np.ones((3, length - mask.shape[1]), np.int64)], axis=1).astype(bool)
    for x, y in zip(ref_cache, bufs, strict=False):
        y = y[:, :, :length]
        assert np.abs(x.transpose(0, 2, 1, 3)[valid] - y.transpose(0, 2, 1, 3)[valid]).max() <= TOL
        assert not np.isnan(y.transpose(0, 2, 1, 3)[valid]).any()


def test_partial_fusion_is_not_shared(graphs_a):
    """A layer left unfused still concatenates its cache: the graph must not be marked shared."""
    g = graphs_a
    fused, report = fuse_attention(_with_exposed_softmax(g.optimized), g.n_head, g.hidden, op=GQA)
    assert report["fused"] == g.n_layer - 1
    assert report["kv_cache"] == "concat" and "not fused" in report["kv_cache_reason"]


# ------------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("op", [MHA, GQA])
@pytest.mark.parametrize("stage", ["raw", "optimized"])
def test_logits_match_single_row(graphs_a, stage, op):
    ids = np.random.default_rng(1).integers(0, 1000, (1, 6)).astype(np.int64)
    _compare_run(graphs_a, stage, op, ids, np.ones((1, 6), np.int64))


@pytest.mark.parametrize("op", [MHA, GQA])
def test_logits_match_left_padded_batch(graphs_a, op):
    ids = np.random.default_rng(2).integers(0, 1000, (2, 7)).astype(np.int64)
    mask = np.ones((2, 7), np.int64)
    mask[1, :4] = 0
    _compare_run(graphs_a, "optimized", op, ids, mask)


def test_gqa_multi_token_step_with_past_batch_one(graphs_a):
    ids = np.random.default_rng(5).integers(0, 1000, (1, 6)).astype(np.int64)
    _compare_run(graphs_a, "optimized", GQA, ids, np.ones((1, 6), np.int64), steps=1, chunk=4)


def test_shape_b_left_padded_batch_and_single_token_prompt(graphs_b):
    g = graphs_b
    ids = np.random.default_rng(3).integers(0, 1000, (3, 5)).astype(np.int64)
    mask = np.ones((3, 5), np.int64)
    mask[0, :2] = 0
    mask[2, :4] = 0
    _compare_run(g, "optimized", MHA, ids, mask, steps=2, chunk=2)
    one = np.array([[42]], np.int64)  # past 0, one token
    _compare_run(g, "raw", MHA, one, np.ones((1, 1), np.int64), steps=1, chunk=2)


def _greedy(g: Graphs, sess, ids, mask, n):
    past = g.empty_past(ids.shape[0])
    out = []
    for _ in range(n):
        logits, past = g.step(sess, ids, mask, past)
        ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
        out.append(ids[:, 0])
    return np.stack(out, 1)


def test_greedy_tokens_equal(graphs_a):
    g = graphs_a
    ids = np.random.default_rng(4).integers(0, 1000, (2, 5)).astype(np.int64)
    mask = np.ones((2, 5), np.int64)
    mask[0, :2] = 0
    ref = _greedy(g, g.session("optimized", None), ids, mask, 10)
    assert np.array_equal(ref, _greedy(g, g.session("optimized", MHA), ids, mask, 10))


def test_runtime_runs_fused_graph_unchanged(graphs_a, tiny_portable_package, tmp_path):
    """The package runtime drives the fused graph through the unchanged I/O contract (past and present as
    separate tensors: the portable package's manifest says kv_cache concat)."""
    import shutil

    from gpt2deploy.package import Package
    from gpt2deploy.runtime.session import DecoderSession

    package_copy = tmp_path / "pkg"
    shutil.copytree(tiny_portable_package, package_copy)

    fused, _ = graphs_a.fused("optimized")
    ref_sess = DecoderSession(Package.open(package_copy), "fp32", "cpu", threads=1)
    onnx.save(fused, str(package_copy / "onnx" / "model.onnx"))
    sess = DecoderSession(Package.open(package_copy), "fp32", "cpu", threads=1)
    ids = np.array([[5, 6, 7, 8], [0, 0, 9, 10]], np.int64)
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]], np.int64)
    la, pa = ref_sess.forward(ids, mask)
    lb, pb = sess.forward(ids, mask)
    assert np.abs(la[mask.astype(bool)] - lb[mask.astype(bool)]).max() <= TOL
    mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    la, _ = ref_sess.forward(ids[:, -1:], mask, past=pa)
    lb, _ = sess.forward(ids[:, -1:], mask, past=pb)
    assert np.abs(la - lb).max() <= TOL


# ------------------------------------------------------------------------------------ partial / no match


def _with_exposed_softmax(src: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose first layer's attention probabilities are also a graph output (so it can't be fused)."""
    model = onnx.ModelProto()
    model.CopyFrom(src)
    sm = next(n for n in model.graph.node if n.op_type == "Softmax")
    model.graph.output.append(onnx.helper.make_tensor_value_info(sm.output[0], onnx.TensorProto.FLOAT, None))
    return model


def test_unmatched_layer_left_whole(graphs_a):
    """A layer whose attention probabilities are also a graph output is not fused; the others are."""
    g = graphs_a
    model = _with_exposed_softmax(g.optimized)
    fused, report = fuse_attention(model, g.n_head, g.hidden)
    assert report["fused"] == g.n_layer - 1 and len(report["unmatched"]) == 1
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["Softmax"] == 1 and ops["MultiHeadAttention"] == g.n_layer - 1
    ids = np.array([[3, 4, 5]], np.int64)
    mask = np.ones((1, 3), np.int64)
    a = _session(model).run(None, _feed(g, ids, mask))
    b = _session(fused).run(None, _feed(g, ids, mask))
    assert np.abs(a[0] - b[0]).max() <= TOL
    assert np.abs(a[-1] - b[-1]).max() <= TOL  # the exposed probabilities are still computed


def _feed(g: Graphs, ids, mask):
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": (np.cumsum(mask, 1) - 1)[:, -ids.shape[1] :]}
    for i, p in enumerate(g.empty_past(ids.shape[0])):
        feed[f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}"] = p
    return feed


def test_no_match_returns_model_unchanged(graphs_a):
    g = graphs_a
    # wrong head count: the head split does not match, nothing is rewritten
    model, report = fuse_attention(g.optimized, 2, g.hidden)
    assert model is g.optimized and report["fused"] == 0 and len(report["unmatched"]) == g.n_layer
    # a graph without attention at all
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 2])
    plain = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    out, report = fuse_attention(plain, 4, 64)
    assert out is plain and report["fused"] == 0 and report["softmax"] == 0


def test_bad_arguments(graphs_a):
    with pytest.raises(QuantError, match="multiple of num_heads"):
        fuse_attention(graphs_a.optimized, 5, 64)
    with pytest.raises(QuantError, match="unknown attention op"):
        fuse_attention(graphs_a.optimized, 4, 64, op="FlashAttention")


# ------------------------------------------------------------------------------------ trained model


@pytest.mark.slow
@requires_gpt2_ref
def test_gpt2_ref_real_text(tmp_path):
    """A trained model on real text: left-padded batch, decode steps, greedy continuation identical."""
    from tokenizers import Tokenizer
    from transformers import GPT2LMHeadModel

    from exporters.onnx_export import export_onnx

    model = GPT2LMHeadModel.from_pretrained(str(GPT2_REF)).eval()
    export_onnx(model, tmp_path / "model.onnx")
    c = model.config
    g = Graphs(onnx.load(str(tmp_path / "model.onnx")), c.n_layer, c.n_head, c.n_embd)
    tok = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    text = EVAL_TEXT.read_text(encoding="utf-8") if EVAL_TEXT.is_file() else "def main():\n    return 0\n" * 20
    a, b = tok.encode(text[:600]).ids[:48], tok.encode(text[600:1200]).ids[:30]
    ids = np.zeros((2, 48), np.int64)
    mask = np.zeros((2, 48), np.int64)
    ids[0], mask[0] = a, 1
    ids[1, 48 - len(b) :], mask[1, 48 - len(b) :] = b, 1
    _compare_run(g, "optimized", MHA, ids, mask, steps=4, chunk=4)
    ref = _greedy(g, g.session("optimized", None), ids, mask, 16)
    assert np.array_equal(ref, _greedy(g, g.session("optimized", MHA), ids, mask, 16))
    assert g.fused("optimized")[1]["fused"] == c.n_layer
