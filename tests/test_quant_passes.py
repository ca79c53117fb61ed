"""The ONNX -> ONNX passes on their own: optimization (incl. graphs without biases), Gemm rewrite,
the shared tied int8 table, FP16 Inf/NaN detection, --exclude resolution, the decoder contract."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant import QuantError
from quant.graph import check_decoder, initializers
from quant.optimize import gemm_to_matmul, optimize

N_LAYER, N_HEAD, HIDDEN, HEAD_DIM = 2, 4, 64, 16  # conftest shape A
IDS = [464, 3290, 318, 257, 1310, 1295, 11, 290, 262, 1893, 11568, 13, 632, 373, 257]


@pytest.fixture(scope="module")
def fp32_graph(tiny_portable_package) -> onnx.ModelProto:
    """The exporter's plain graph (a default export is already optimized)."""
    return onnx.load(str(tiny_portable_package / "onnx" / "model.onnx"))


def _session(model) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _prompt_and_step(model) -> list[np.ndarray]:
    """Logits of a prompt and of one decode step with past."""
    sess = _session(model)
    names = [f"past_key_values.{i}.{k}" for i in range(N_LAYER) for k in ("key", "value")]
    outs = ["logits"] + [f"present.{i}.{k}" for i in range(N_LAYER) for k in ("key", "value")]
    ids = np.array([IDS[:-1]], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
    feed.update({n: np.zeros((1, N_HEAD, 0, HEAD_DIM), np.float32) for n in names})
    first = sess.run(outs, feed)
    step = {
        "input_ids": np.array([IDS[-1:]]),
        "attention_mask": np.ones((1, len(IDS)), np.int64),
        "position_ids": np.array([[len(IDS) - 1]]),
    }
    step.update(zip(names, first[1:], strict=False))
    return [first[0], sess.run(outs, step)[0]]


def _gemm_biases(model) -> list[str]:
    return [n.input[2] for n in model.graph.node if n.op_type == "Gemm" and len(n.input) > 2]


def test_optimize_fuses_and_keeps_logits(fp32_graph):
    ref = _prompt_and_step(fp32_graph)
    opt, report = optimize(copy.deepcopy(fp32_graph), N_HEAD, HIDDEN)
    assert report.fused["SkipLayerNormalization"] == 2 * N_LAYER
    assert report.fused["FastGelu"] == N_LAYER
    assert "Gemm" not in report.ops_after
    assert report.ops_after["Reshape"] < report.ops_before["Reshape"]
    for a, b in zip(_prompt_and_step(opt), ref, strict=False):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("kind", ["absent", "zero"])
def test_optimize_graph_without_biases(fp32_graph, kind):
    """Exporters drop zero biases (Gemm without C) or keep them as zeros; both must optimize and match."""
    biases = _gemm_biases(fp32_graph)
    assert biases, "the test graph should have Gemm biases to remove"
    zeroed = copy.deepcopy(fp32_graph)
    inits = initializers(zeroed)
    for name in biases:
        inits[name].CopyFrom(numpy_helper.from_array(np.zeros(tuple(inits[name].dims), np.float32), name))
    ref = _prompt_and_step(zeroed)
    if kind == "absent":
        graph = copy.deepcopy(fp32_graph)
        for node in graph.graph.node:
            if node.op_type == "Gemm" and len(node.input) > 2:
                del node.input[2]
        keep = [t for t in graph.graph.initializer if t.name not in set(biases)]
        del graph.graph.initializer[:]
        graph.graph.initializer.extend(keep)
        assert not _gemm_biases(graph)
    else:
        graph = copy.deepcopy(zeroed)
    opt, report = optimize(graph, N_HEAD, HIDDEN)
    assert report.fused["SkipLayerNormalization"] == 2 * N_LAYER
    assert report.fused["FastGelu"] == N_LAYER
    assert "Gemm" not in report.ops_after
    for a, b in zip(_prompt_and_step(opt), ref, strict=False):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_gemm_rewrite_folds_trans_alpha_beta():
    rng = np.random.default_rng(0)
    w, c = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="g", transB=1, alpha=0.5, beta=2.0)
    graph = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feed = {"x": rng.standard_normal((2, 3)).astype(np.float32)}
    want = _session(model).run(None, feed)[0]
    out, info = gemm_to_matmul(copy.deepcopy(model))
    assert info["gemm_rewritten"] == 1 and [n.op_type for n in out.graph.node] == ["MatMul", "Add"]
    np.testing.assert_allclose(_session(out).run(None, feed)[0], want, rtol=1e-5, atol=1e-5)


def test_shared_tied_int8_table(fp32_graph):
    from quant.int8 import quantize_int8
    from quant.report import describe

    opt, _ = optimize(copy.deepcopy(fp32_graph), N_HEAD, HIDDEN)
    q, info = quantize_int8(copy.deepcopy(opt))
    tied = info.details["tied_embedding"]
    assert tied["shared"] is True and tied["op"] == "MatMulNBits" and tied["bits"] == 8
    inits = initializers(q)
    table = inits[f"{tied['weight']}_q8"]
    bs = tied["block_size"]
    assert table.data_type == TensorProto.UINT8 and list(table.dims) == [50257, -(-HIDDEN // bs), bs]
    users = [n.op_type for n in q.graph.node if table.name in n.input]
    assert sorted(users) == ["Gather", "MatMulNBits"]  # one table, two users
    assert describe(q)["weight_matmuls"]["float"] == 0
    # the embedding rebuilt from the table is within half a quantization step of the fp32 embedding
    w = numpy_helper.to_array(initializers(opt)[tied["weight"]])
    step = np.abs(w).max(axis=1) / 127
    assert tied["max_abs_error"] <= step.max() / 2 + 1e-7


def test_fp16_check_catches_overflow(fp32_graph, tmp_path):
    """Logits scaled past the float16 range become Inf in the fp16 graph: the check refuses it."""
    from quant.fp16 import convert_fp16
    from quant.sample_check import check_finite

    opt, _ = optimize(copy.deepcopy(fp32_graph), N_HEAD, HIDDEN)
    fine, _ = convert_fp16(copy.deepcopy(opt))
    onnx.save(fine, str(tmp_path / "fine.onnx"))
    assert check_finite(tmp_path / "fine.onnx", IDS, N_LAYER, N_HEAD, HEAD_DIM)["finite"]
    inits = initializers(opt)
    for name in ("model.transformer.ln_f.weight", "model.transformer.ln_f.bias"):
        inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]) * np.float32(1e6), name))
    broken, _ = convert_fp16(opt)
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    with pytest.raises(QuantError, match="Inf/NaN"):
        check_finite(tmp_path / "broken.onnx", IDS, N_LAYER, N_HEAD, HEAD_DIM)


def test_exclude_resolution(fp32_graph):
    from quant.exclude import resolve_exclude
    from quant.lm_head import untie_lm_head

    opt, _ = optimize(copy.deepcopy(fp32_graph), N_HEAD, HIDDEN)
    opt, _ = untie_lm_head(opt)
    assert len(resolve_exclude(opt, ["lm_head"])) == 1
    assert len(resolve_exclude(opt, ["model.transformer.h.0."])) == 4
    assert len(resolve_exclude(opt, ["model.transformer.h.1.mlp.c_fc.weight"])) == 1
    with pytest.raises(QuantError, match="matches no weight MatMul"):
        resolve_exclude(opt, ["model.transformer.h.9."])


def test_decoder_contract(fp32_graph):
    assert check_decoder(fp32_graph) == N_LAYER
    with pytest.raises(QuantError, match="layers 0..2"):
        check_decoder(fp32_graph, n_layer=3)
    broken = copy.deepcopy(fp32_graph)
    broken.graph.output[1].name = "present_0_key"
    with pytest.raises(QuantError, match="present.0.key"):
        check_decoder(broken)


@pytest.mark.parametrize("head_bits", [4, 8])
def test_int4_embedding_reads_the_lm_head_blocks(fp32_graph, head_bits):
    """The tied embedding lookup returns exactly the rows MatMulNBits multiplies by (one table, two users)."""
    from quant.blocks import dequantize_rows
    from quant.nbits import quantize_nbits

    opt, _ = optimize(copy.deepcopy(fp32_graph), N_HEAD, HIDDEN)
    w = numpy_helper.to_array(initializers(opt)["model.lm_head.weight"])
    q, info = quantize_nbits(copy.deepcopy(opt), head_bits=head_bits, block_size=16)
    assert info.details["tied_embedding"]["shared"] is True and info.details["tied_embedding"]["bits"] == head_bits
    assert info.head.bits == head_bits and info.head.shared_with_embedding
    head = next(n for n in q.graph.node if "logits" in n.output)
    table = head.input[1]
    assert sorted(n.op_type for n in q.graph.node if table in n.input) == ["Gather", "MatMulNBits"]
    assert "model.lm_head.weight" not in initializers(q)
    inits = initializers(q)
    zp = numpy_helper.to_array(inits[head.input[3]]) if len(head.input) > 3 and head.input[3] else None
    rows = dequantize_rows(
        numpy_helper.to_array(inits[table]), numpy_helper.to_array(inits[head.input[2]]), zp, head_bits, HIDDEN
    )
    emb_name = next(
        n.output[0] for n in fp32_graph.graph.node if n.op_type == "Gather" and n.input[0] == "model.lm_head.weight"
    )
    q.graph.output.append(helper.make_tensor_value_info(emb_name, TensorProto.FLOAT, None))
    sess = _session(q)
    ids = np.array([IDS[:5], [0, 1, 50256, 7, 99]], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(5), (2, 1))}
    feed.update(
        {
            f"past_key_values.{i}.{k}": np.zeros((2, N_HEAD, 0, HEAD_DIM), np.float32)
            for i in range(N_LAYER)
            for k in ("key", "value")
        }
    )
    emb = sess.run([emb_name], feed)[0]
    np.testing.assert_allclose(emb, rows[ids], atol=1e-6)
    assert np.abs(emb - w[ids]).max() < (0.2 if head_bits == 4 else 0.02) * np.abs(w).max()


def test_nbits_projection_bias_in_the_matmul(fp32_graph):
    """Each projection's bias is MatMulNBits' own input (no Add after it); the logits are those of the Adds."""
    from quant.bias import fold_matmul_bias
    from quant.nbits import quantize_nbits

    opt, _ = optimize(copy.deepcopy(fp32_graph), N_HEAD, HIDDEN)
    q, info = quantize_nbits(copy.deepcopy(opt), block_size=16)
    assert info.details["bias_folded"] >= 2 * N_LAYER
    index = {o: n for n in q.graph.node for o in n.output}
    for node in q.graph.node:
        if node.op_type == "Add" and node.domain in ("", "ai.onnx"):
            assert all(index.get(i) is None or index[i].op_type != "MatMulNBits" for i in node.input)
    with_bias = [n for n in q.graph.node if n.op_type == "MatMulNBits" and len(n.input) > 5 and n.input[5]]
    assert len(with_bias) == info.details["bias_folded"]
    # the same quantized weights with the Adds spelled out give the same logits
    unfolded = copy.deepcopy(q)
    adds = []
    for node in unfolded.graph.node:
        if node.op_type == "MatMulNBits" and len(node.input) > 5 and node.input[5]:
            out, bias = node.output[0], node.input[5]
            node.input[5] = ""
            node.output[0] = f"{out}_unbiased"
            adds.append((node, helper.make_node("Add", [f"{out}_unbiased", bias], [out])))
    for node, add in adds:
        unfolded.graph.node.insert(list(unfolded.graph.node).index(node) + 1, add)
    for got, ref in zip(_prompt_and_step(q), _prompt_and_step(unfolded), strict=True):
        assert np.abs(got - ref).max() < 1e-4
    assert fold_matmul_bias(q) == 0  # nothing left to fold
