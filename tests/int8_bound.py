"""How far an int8 (DynamicQuantizeLinear -> MatMulInteger) projection may land from exact arithmetic.

ONNX Runtime picks a different integer kernel per CPU kind: AVX-VNNI/AVX512-VNNI and ARM accumulate
u8 x s8 products exactly in 32 bits, AVX2 and AVX-512 without VNNI add them pairwise into saturating
16-bit lanes first. So int8 logits differ from CPU to CPU, and a tolerance measured on one machine fails
on another. This module derives the tolerance from the quantization itself, for one call:

- activation rounding: x is quantized with one scale ``s`` per call, so each element moves by at most
  ``s / 2`` (more only where the zero point's rounding clips the extreme value: that error is taken as
  computed); summed through ``|W|`` per output;
- 16-bit saturation: products ``a * w`` (u8 activation, s8 weight) are paired; a pair beyond +-32767 loses
  the excess. Which products are paired depends on the kernel's packing, so the bound pairs the largest
  magnitudes together (no pairing loses more); zero on VNNI, where nothing saturates.

``call_bound(x, Wq, w_scale, w_zero)`` returns, per output, the bound on ``|ORT - x @ W|`` for that call.
"""

from __future__ import annotations

import numpy as np

INT16_MAX = 32767


def dynamic_quantize(x: np.ndarray) -> tuple[np.ndarray, float, int]:
    """DynamicQuantizeLinear: one uint8 scale and zero point over the whole tensor (range includes 0)."""
    rmin, rmax = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = (rmax - rmin) / 255.0 or 1.0
    zero = int(np.clip(np.rint(-rmin / scale), 0, 255))
    q = np.clip(np.rint(x / scale) + zero, 0, 255).astype(np.int64)
    return q, scale, zero


def call_bound(x: np.ndarray, wq: np.ndarray, w_scale, w_zero) -> np.ndarray:
    """Per row of ``x`` [rows, K] and output [N]: the largest ``|ORT result - x @ dequant(W)|`` for one call
    quantizing all of ``x`` at once (float32 rounding included)."""
    q, scale, zero = dynamic_quantize(x)
    w_scale = np.asarray(w_scale, np.float64).reshape(-1)
    w_deq = (wq.astype(np.float64) - np.asarray(w_zero, np.float64).reshape(-1)) * w_scale
    elem = np.maximum(np.abs((q - zero) * scale - x.astype(np.float64)), scale / 2) * (1 + 1e-6)  # [rows, K]
    rounding = elem @ np.abs(w_deq)  # [rows, N]
    sat = np.zeros_like(rounding)
    w = wq.astype(np.int64)
    for r in range(x.shape[0]):
        prods = np.sort(np.abs(q[r][:, None] * w), axis=0)[::-1]  # [K, N] largest first
        k = prods.shape[0] - prods.shape[0] % 2
        excess = np.maximum(prods[0:k:2] + prods[1:k:2] - INT16_MAX, 0).sum(axis=0)
        sat[r] = excess * scale * w_scale
    exact = (x.astype(np.float64) @ w_deq) if x.size else rounding
    fp32 = 1e-5 + 1e-5 * np.abs(exact)  # float32 scale multiply and accumulation order
    return rounding + sat + fp32


def head_probe(graph_path, out_path) -> dict:
    """Copy the int8 graph with the float input of its logits projection as an extra output.

    Returns {"input": name of that output, "wq", "w_scale", "w_zero"} (the projection's weights)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph_path))  # with its external data
    nodes = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = nodes["logits"]
    while node.op_type != "MatMulInteger":  # logits = Cast(MatMulInteger(...)) * (a_scale * w_scale)
        node = next(nodes[i] for i in node.input if i in nodes and nodes[i].op_type in ("Cast", "MatMulInteger"))
    dql = nodes[node.input[0]]
    assert dql.op_type == "DynamicQuantizeLinear", dql.op_type
    scale_mul = next(n for n in model.graph.node if n.op_type == "Mul" and dql.output[1] in n.input)
    w_scale_name = next(i for i in scale_mul.input if i != dql.output[1])
    w_zero = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else np.zeros(1, np.int8)
    model.graph.output.append(onnx.helper.make_tensor_value_info(dql.input[0], onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(out_path))
    return {"input": dql.input[0], "wq": inits[node.input[1]], "w_scale": inits[w_scale_name], "w_zero": w_zero}
