"""Sampling math on crafted logits, checked against transformers' logits processors; option validation."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2deploy.errors import UsageError
from gpt2deploy.runtime.options import build_options
from gpt2deploy.runtime.sampling import (
    SeenTokens,
    apply_repetition_penalty,
    apply_temperature,
    choose,
    draw,
    top_k_filter,
    top_p_filter,
)


def test_repetition_penalty_on_crafted_logits():
    logits = np.array([[2.0, -2.0, 1.0, -1.0]], np.float32)
    seen = np.array([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    np.testing.assert_allclose(out, [[1.0, -4.0, 1.0, -1.0]])
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_top_k_keeps_ties_and_k_largest():
    logits = np.array([[1.0, 5.0, 3.0, 5.0, 2.0]], np.float32)
    out = top_k_filter(logits, 2)
    assert np.isfinite(out).tolist() == [[False, True, False, True, False]]
    out = top_k_filter(np.array([[1.0, 4.0, 3.0, 3.0]], np.float32), 2)  # tie at the boundary is kept
    assert np.isfinite(out).tolist() == [[False, True, True, True]]
    assert top_k_filter(logits, 0) is logits


def test_top_p_keeps_smallest_nucleus():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = np.log(probs).astype(np.float32)
    assert np.isfinite(top_p_filter(logits, 0.8)).tolist() == [[True, True, False, False]]
    assert np.isfinite(top_p_filter(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert np.isfinite(top_p_filter(logits, 0.1)).tolist() == [[True, False, False, False]]  # at least one stays


def _hf_processors():
    transformers = pytest.importorskip("transformers")
    return transformers


@pytest.mark.parametrize("seed", [0, 1])
def test_processors_match_transformers_on_random_logits(seed):
    import torch

    tf = _hf_processors()
    rng = np.random.default_rng(seed)
    vocab = 2000  # larger than the top-p candidate window, so the fallback path runs too
    logits = (rng.standard_normal((3, vocab)) * 3).astype(np.float32)
    ids = rng.integers(0, vocab, size=(3, 12))
    seen = np.zeros((3, vocab), bool)
    for r in range(3):
        seen[r, ids[r]] = True
    t_logits = torch.from_numpy(logits.copy())
    t_ids = torch.from_numpy(ids)
    ref = tf.RepetitionPenaltyLogitsProcessor(1.3)(t_ids, t_logits.clone()).numpy()
    np.testing.assert_allclose(apply_repetition_penalty(logits, seen, 1.3), ref, rtol=1e-6)
    for k in (1, 5, 50):
        ref = tf.TopKLogitsWarper(k)(t_ids, t_logits.clone()).numpy()
        np.testing.assert_array_equal(np.isfinite(top_k_filter(logits, k)), np.isfinite(ref))
    for p in (0.05, 0.5, 0.9, 0.999):
        ref = tf.TopPLogitsWarper(p)(t_ids, t_logits.clone()).numpy()
        np.testing.assert_array_equal(np.isfinite(top_p_filter(logits, p)), np.isfinite(ref), err_msg=f"top_p={p}")


def test_draw_follows_the_distribution():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    logits = np.tile(np.log(probs).astype(np.float32), (20000, 1))
    counts = np.bincount(draw(logits, np.random.default_rng(0)), minlength=4) / 20000
    np.testing.assert_allclose(counts, probs, atol=0.015)
    masked = np.array([[0.0, -np.inf, 0.0, -np.inf]] * 500, np.float32)
    assert set(draw(masked, np.random.default_rng(1)).tolist()) == {0, 2}


def test_choose_greedy_and_sampled():
    logits = np.array([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]], np.float32)
    o = build_options({}, {})
    assert choose(logits, o, None, None).tolist() == [1, 0]
    o = build_options({}, {"do_sample": True, "top_k": 1, "seed": 3})
    assert choose(logits, o, np.random.default_rng(3), None).tolist() == [1, 0]
    o = build_options({}, {"repetition_penalty": 10.0})
    seen = SeenTokens([[1, 1], [2]], vocab=3, capacity=8)
    assert seen.of(0).tolist() == [1] and seen.mask.tolist() == [[False, True, False], [False, False, True]]
    assert choose(logits, o, None, seen).tolist() == [2, 0]


@pytest.mark.parametrize(
    "opts",
    [
        {"do_sample": True, "top_p": 0.9},
        {"do_sample": True, "top_p": 0.3, "temperature": 0.7},
        {"do_sample": True, "top_k": 40},
        {"do_sample": True, "top_k": 300, "top_p": 0.95, "temperature": 1.3, "repetition_penalty": 1.2},
        {"do_sample": True},
    ],
)
def test_fast_choice_equals_reference_filters(opts):
    """choose() works on candidates only; it must pick exactly what the full-vocabulary pipeline picks."""
    rng = np.random.default_rng(42)
    o = build_options({}, opts)
    vocab = 5000
    for trial in range(20):
        logits = (rng.standard_normal((2, vocab)) * (0.5 + trial / 5)).astype(np.float32)
        rows = [rng.integers(0, vocab, 30).tolist(), rng.integers(0, vocab, 5).tolist()]
        seen = SeenTokens(rows, vocab, 64)
        got = choose(logits, o, np.random.default_rng(trial), seen)
        ref = apply_repetition_penalty(logits, seen.mask, o.repetition_penalty)
        ref = top_p_filter(top_k_filter(apply_temperature(ref, o.temperature), o.top_k), o.top_p)
        assert got.tolist() == draw(ref, np.random.default_rng(trial)).tolist()


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"do_sample": True, "temperature": 0}, "temperature must be > 0"),
        ({"do_sample": True, "temperature": -1.0}, "temperature must be > 0"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
        ({"seed": -3}, "seed must be"),
        ({"stop": [""]}, "stop strings must be non-empty"),
        ({"max_new_tokens": 2.5}, "whole number"),
        ({"bogus": 1}, "unknown generation option"),
    ],
)
def test_bad_options(opts, match):
    with pytest.raises(UsageError, match=match):
        build_options({}, opts)


def test_defaults_from_package_and_overrides():
    o = build_options({"eos_token_id": 7, "top_k": 40, "do_sample": False}, {"top_k": 5})
    assert o.eos_ids == (7,) and o.top_k == 5 and o.pad_token_id == 7
    assert build_options({"eos_token_id": [3, 4]}, {"ignore_eos": True}).eos_ids == ()
    assert build_options({}, {"stop": "x"}).stop == ("x",)
    assert build_options({}, {"temperature": 0}).temperature == 0  # ignored without sampling
