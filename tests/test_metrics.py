"""Accuracy metric mechanics on crafted logits: exact values where the maths gives them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gpt2deploy.accuracy import gates
from gpt2deploy.accuracy.baseline import compare
from gpt2deploy.accuracy.metrics import (
    LogitComparison,
    ReferenceLogits,
    greedy_prefix_match,
    kl_divergence,
    percentile,
    top_k_ids,
)
from gpt2deploy.accuracy.report import sanitize
from gpt2deploy.errors import UsageError

VOCAB = 1000


def _logits(n=16, seed=0, scale=3.0):
    return (np.random.default_rng(seed).standard_normal((n, VOCAB)) * scale).astype(np.float32)


def _summary(ref, var, targets):
    c = LogitComparison()
    c.add(ReferenceLogits.of(ref), var, targets)
    return c.summary()


def _softmax64(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_identical_logits_give_zero_delta_full_agreement_zero_kl():
    ref = _logits()
    targets = np.arange(15) * 7
    m = _summary(ref, ref.copy(), targets)
    assert m["ppl_delta"] == 0.0 and m["ppl"] == m["ppl_ref"]
    assert m["top1"] == 1.0 and m["top5"] == 1.0
    assert m["kl_mean"] == 0.0 and m["kl_p99"] == 0.0
    assert m["logit_max"] == 0.0 and m["logit_p99"] == 0.0
    assert m["nonfinite"] == 0 and m["positions"] == 16


def test_perplexity_matches_definition():
    ref = _logits(seed=1)
    targets = np.random.default_rng(2).integers(0, VOCAB, 15)
    p = _softmax64(ref)[np.arange(15), targets]
    m = _summary(ref, ref, targets)
    assert m["ppl_ref"] == pytest.approx(math.exp(-np.mean(np.log(p))), rel=1e-6)
    uniform = np.zeros((4, VOCAB), np.float32)
    assert _summary(uniform, uniform, np.array([1, 2, 3]))["ppl"] == pytest.approx(VOCAB, rel=1e-6)


def test_constant_shift_changes_nothing_but_raw_logits():
    ref = _logits(seed=3)
    m = _summary(ref, ref + np.float32(2.5), np.arange(15))
    assert m["kl_mean"] < 1e-6 and m["top1"] == 1.0 and m["top5"] == 1.0
    assert abs(m["ppl_delta"]) < 1e-6
    assert m["logit_max"] == pytest.approx(2.5, abs=1e-5)


def test_single_logit_perturbation_gives_analytic_kl():
    """Adding c to one logit j: KL(p||q) = log(1 - p_j + p_j e^c) - p_j c."""
    ref = _logits(seed=4, scale=2.0)
    j, c = 17, 1.5
    var = ref.copy()
    var[:, j] += np.float32(c)
    pj = _softmax64(ref)[:, j]
    expected = np.log(1 - pj + pj * math.exp(c)) - pj * c
    got = kl_divergence(ref, var)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-8)
    # and against the textbook sum over the vocabulary
    p, q = _softmax64(ref), _softmax64(var)
    np.testing.assert_allclose(got, np.sum(p * (np.log(p) - np.log(q)), -1), rtol=1e-4, atol=1e-8)
    m = _summary(ref, var, np.arange(15))
    assert m["kl_mean"] == pytest.approx(float(np.mean(expected)), rel=1e-4)
    assert m["kl_p99"] == pytest.approx(float(np.percentile(expected, 99)), rel=1e-4)
    assert m["logit_max"] == pytest.approx(c, abs=1e-6)


def test_top1_and_top5_agreement_counts():
    ref = np.zeros((2, VOCAB), np.float32)
    ref[:, :5] = [[10, 9, 8, 7, 6]] * 2  # top-5 = {0..4}
    var = ref.copy()
    var[0, 0] = 0  # row 0: top-1 moves to token 1, token 0 leaves the top-5 (replaced by token 5)
    var[0, 5] = 5
    var[1, 3:5] = 0  # row 1: tokens 3 and 4 leave the top-5
    var[1, 900:902] = [6.5, 6.4]
    np.testing.assert_array_equal(top_k_ids(var)[1], [0, 1, 2, 900, 901])
    m = _summary(ref, var, np.array([0]))
    assert m["top1"] == 0.5
    assert m["top5"] == pytest.approx((4 / 5 + 3 / 5) / 2)


def test_nonfinite_logits_are_counted_and_fail_every_gate_that_sees_them():
    ref = _logits(seed=5)
    var = ref.copy()
    var[3, 10] = np.nan
    var[7, 11] = np.inf
    var[8, 12] = -np.inf
    m = _summary(ref, var, np.arange(15))
    assert m["nonfinite"] == 3 and m["ref_nonfinite"] == 0
    assert math.isnan(m["kl_mean"])
    failures = gates.evaluate(m, gates.DEFAULTS["int4"])
    assert any(f.startswith("nonfinite 3 >") for f in failures)
    assert any(f.startswith("kl_mean") for f in failures)
    clean = sanitize(m)
    json.loads(json.dumps(clean), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert clean["kl_mean"] is None


def test_greedy_prefix_match_and_percentile():
    ref = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]])
    var = np.array([[1, 2, 3, 4], [1, 9, 3, 4], [0, 6, 7, 8]])
    np.testing.assert_array_equal(greedy_prefix_match(ref, var), [4, 1, 0])
    assert percentile(np.arange(101), 99) == pytest.approx(99.0)
    assert math.isnan(percentile([1.0, float("nan")], 99))


def test_threshold_parsing():
    g, t = gates.parse_thresholds(["kl_mean=0.05", "top1=0.8", "kl_mean.tol=0.01"])
    assert g == {"kl_mean": 0.05, "top1": 0.8} and t == {"kl_mean": 0.01}
    assert gates.parse_thresholds({"greedy": 0.1}) == ({"greedy": 0.1}, {})
    for bad, words in [
        ("kl_meen=0.1", "unknown threshold 'kl_meen'"),
        ("kl_mean", "malformed"),
        ("=3", "malformed"),
        ("kl_mean=abc", "not a number"),
        ("kl_mean=nan", "not finite"),
        ("top1.tol=-1", "negative"),
    ]:
        with pytest.raises(UsageError, match=words):
            gates.parse_thresholds([bad])


def test_default_gates_are_ordered_by_precision():
    """fp32 is the tightest table, then fp16, int8, int4; every table names every gate."""
    order = ["fp32", "fp16", "int8", "int4"]
    for name, gate in gates.GATES.items():
        values = [gates.DEFAULTS[p][name] for p in order]
        assert values == (sorted(values) if gate.direction == "max" else sorted(values, reverse=True)), name
    assert gates.defaults_for("bf16") == (gates.DEFAULTS["int4"], "int4")


def test_gate_direction_and_baseline_tolerance():
    metrics = {"kl_mean": 0.01, "top1": 0.95, "ppl_delta": -0.02}
    assert gates.evaluate(metrics, {"kl_mean": 0.02, "top1": 0.9, "ppl_delta": 0.03}) == []
    assert gates.evaluate(metrics, {"ppl_delta": 0.01}) == ["ppl_delta 0.02 > 0.01"]  # |Δ| is gated
    assert gates.evaluate(metrics, {"top1": 0.96}) == ["top1 0.95 < 0.96"]
    base = {"kl_mean": 0.005, "top1": 0.951, "ppl_delta": -0.02}
    failures, detail = compare(metrics, base, gates.tolerances({"kl_mean": 0.001}))
    assert len(failures) == 1 and failures[0].startswith("kl_mean 0.01 is worse than the baseline's 0.005")
    assert detail["top1"]["worse_by"] == pytest.approx(0.001)
    assert compare(metrics, metrics, gates.tolerances())[0] == []
