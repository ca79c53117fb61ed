"""Continuous batching in the runtime: rows that join a running batch at any step, with their own options,
produce exactly what they produce alone; cancelled rows leave; prompt scoring matches a plain forward."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MIXED_PROMPTS as PROMPTS

import gpt2deploy
from gpt2deploy.runtime.batcher import REGROUP_SLACK, Batcher, Row, log_softmax

BUDGETS = [5, 30, 12, 40, 7, 25, 60, 3]


@pytest.fixture(scope="module", params=["ragged", "padded", "concat"])
def model(request, tiny_package, tiny_portable_package):
    """ragged: rows of different lengths in one in-place cache (the graphs gpt2deploy writes); padded: the same
    graph driven as packages without ``ragged_rows`` are (rows left-padded to one width); concat: a plain graph."""
    m = gpt2deploy.load(tiny_package if request.param != "concat" else tiny_portable_package, device="cpu", threads=1)
    assert m.session.ragged_rows == (request.param != "concat")
    if request.param == "padded":
        m.session.ragged_rows = False
    return m


def _row(b: Batcher, model, prompt: str, **opts) -> Row:
    ids, _, o = b.fit(model.encode(prompt), model.options(**opts))
    return Row(ids, o)


@pytest.mark.timeout(120, func_only=True)
@pytest.mark.parametrize("every,chunk", [(1, 256), (3, 4)])
def test_rows_joining_a_running_batch_equal_their_solo_runs(model, every, chunk):
    """Rows join every step or every third; prompts run whole or in chunks of 4 positions between steps."""
    solo = [
        model.generate_ids([model.encode(p)], max_new_tokens=n, ignore_eos=True).tokens[0]
        for p, n in zip(PROMPTS, BUDGETS, strict=True)
    ]
    b = Batcher(model.session, model.token_bytes, prefill_chunk=chunk)
    rows, waiting, steps, widest = [], list(zip(PROMPTS, BUDGETS, strict=True)), 0, 0
    while waiting or b.size:
        if waiting and steps % every == 0:
            p, n = waiting.pop(0)
            rows.append(_row(b, model, p, max_new_tokens=n, ignore_eos=True))
            b.add(rows[-1])
        b.step()
        steps += 1
        widest = max(widest, len(b.rows))
        if b.stepper is not None:  # padding columns beyond the longest row's own positions stay bounded
            longest = max(r.length for r in b.rows)
            assert longest <= b.stepper.length <= min(longest + REGROUP_SLACK, b.stepper.capacity)
    assert [r.tokens for r in rows] == solo
    assert widest >= 4  # rows really ran together
    assert all(r.reason == "length" for r in rows)


@pytest.mark.timeout(60, func_only=True)
def test_per_row_sampling_options_reproduce_generate_with_the_seed(model):
    opts = dict(max_new_tokens=20, do_sample=True, temperature=0.8, top_p=0.9, top_k=50, seed=3, repetition_penalty=1.3)
    alone = model.generate_ids([model.encode("Hello")], ignore_eos=True, **opts).tokens[0]
    greedy = model.generate_ids([model.encode("other stuff here")], max_new_tokens=33, ignore_eos=True).tokens[0]
    b = Batcher(model.session, model.token_bytes)
    other = _row(b, model, "other stuff here", max_new_tokens=33, ignore_eos=True)
    b.add(other)
    for _ in range(4):
        b.step()
    sampled = _row(b, model, "Hello", ignore_eos=True, **opts)
    b.add(sampled)
    while b.size:
        b.step()
    assert sampled.tokens == alone and other.tokens == greedy


@pytest.mark.timeout(60, func_only=True)
def test_cancelled_row_leaves_and_the_rest_continue(model):
    full = model.generate_ids([model.encode(PROMPTS[1])], max_new_tokens=30, ignore_eos=True).tokens[0]
    b = Batcher(model.session, model.token_bytes)
    keep, drop = (_row(b, model, p, max_new_tokens=30, ignore_eos=True) for p in PROMPTS[1:3])
    b.add(keep)
    b.add(drop)
    b.step()
    assert len(b.rows) == 1 and len(b.prefilling) == 1  # one prompt chunk per step
    b.step()
    assert len(b.rows) == 2
    emit = b.cancel(drop)
    assert emit.finish == "cancelled" and b.size == 1
    b.step()
    assert b.rows == [keep]
    while b.size:
        b.step()
    assert keep.tokens == full and len(drop.tokens) == 2


@pytest.mark.timeout(60, func_only=True)
def test_stop_strings_and_eos_finish_rows(model):
    text = model.generate("Hello", max_new_tokens=12, ignore_eos=True)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    want = model.generate("Hello", max_new_tokens=12, ignore_eos=True, stop=[stop])
    b = Batcher(model.session, model.token_bytes)
    r = _row(b, model, "Hello", max_new_tokens=12, ignore_eos=True, stop=[stop])
    b.add(r)
    pieces = []
    while b.size:
        pieces += [e.text for e in b.step()]
    assert "".join(pieces) == want and r.reason == "stop"
    greedy = model.generate_ids([model.encode("Hello")], max_new_tokens=6, ignore_eos=True).tokens[0]
    eos = greedy[2]
    r = _row(b, model, "Hello", max_new_tokens=6, eos_token_id=eos)
    b.add(r)
    while b.size:
        b.step()
    assert r.reason == "eos" and r.tokens[-1] == eos and len(r.tokens) == greedy.index(eos) + 1


@pytest.mark.timeout(60, func_only=True)
def test_logprobs_of_generated_and_prompt_tokens(model):
    b = Batcher(model.session, model.token_bytes)
    ids = model.encode("The quick brown fox jumps over")
    r = Row(ids, b.fit(ids, model.options(max_new_tokens=4))[2], logprobs=3)
    b.add(r)
    emits = []
    while b.size:
        emits += b.step()
    logits, _ = model.session.forward(np.array([ids + r.tokens[:-1]]), logits_to_keep=0)
    for k, e in enumerate(emits):
        ref = log_softmax(logits[0, len(ids) - 1 + k])
        assert e.logprob.token == r.tokens[k]
        assert e.logprob.logprob == pytest.approx(float(ref[r.tokens[k]]), abs=1e-4)
        assert [t for t, _ in e.logprob.top] == list(np.argsort(-ref)[:3])  # greedy: the first is the token
    scored = b.prompt_logprobs(ids, 2)
    assert scored[0].logprob is None and len(scored) == len(ids)
    for k in range(1, len(ids)):
        ref = log_softmax(logits[0, k - 1])
        assert scored[k].logprob == pytest.approx(float(ref[ids[k]]), abs=1e-4)
        assert scored[k].top[0][0] == int(ref.argmax())


@pytest.mark.timeout(120, func_only=True)
@pytest.mark.parametrize("slack", [0, 1000])
def test_rows_regroup_in_place_through_widening_shrinking_and_a_full_cache(model, monkeypatch, slack):
    """Slack 0: every leave of the longest row moves all rows left; 1000: the width only grows, until the cache
    is full and every row moves to the longest's width. A long prompt joining short rows widens them."""
    import gpt2deploy.runtime.batcher as batcher

    monkeypatch.setattr(batcher, "REGROUP_SLACK", slack)
    long_prompt = " ".join(["word"] * 50)
    plan = [("Hi", 100), (long_prompt, 8), ("a b c", 40), (long_prompt + " again", 20), ("x y", 60)]
    solo = [model.generate_ids([model.encode(p)], max_new_tokens=n, ignore_eos=True).tokens[0] for p, n in plan]
    b = Batcher(model.session, model.token_bytes, max_rows=3)
    rows, waiting, steppers, widths = [], list(plan), set(), []
    while waiting or b.size:
        if waiting and b.size < 3:
            p, n = waiting.pop(0)
            rows.append(_row(b, model, p, max_new_tokens=n, ignore_eos=True))
            b.add(rows[-1])
        b.step()
        if b.stepper is not None:
            steppers.add(id(b.stepper))
            widths.append(b.stepper.length)
    assert [r.tokens for r in rows] == solo
    capacity = model.dims.n_positions
    if model.session.kv_shared:
        assert len(steppers) == 1  # one cache allocation for the whole run: rows moved in place
        if model.session.ragged_rows:
            assert max(widths) == max(len(r.ids) + len(r.tokens) - 1 for r in rows)  # no padding, ever
        elif slack:
            assert max(widths) == capacity  # the width grew to the end of the cache, then compacted
    assert max(widths) <= capacity


@pytest.mark.timeout(60, func_only=True)
def test_prompt_chunks_only_while_rows_wait_for_tokens(model):
    """With nothing decoding, a prompt runs in one go; while a row decodes, in ``prefill_chunk`` pieces."""
    b = Batcher(model.session, model.token_bytes, prefill_chunk=4)
    first = _row(b, model, "a b c d e f g h i j k l m n o p", max_new_tokens=30, ignore_eos=True)
    assert len(first.ids) > 8
    b.add(first)
    b.step()
    assert b.rows == [first] and len(first.tokens) == 2  # prompt whole, then its first decode step
    second = _row(b, model, "q r s t u v w x y z", max_new_tokens=5, ignore_eos=True)
    b.add(second)
    steps = 0
    while second not in b.rows:
        b.step()
        steps += 1
    assert steps == -(-len(second.ids) // 4)  # one 4-position chunk per step of the running row
    while b.size:
        b.step()
    alone = model.generate_ids([model.encode("q r s t u v w x y z")], max_new_tokens=5, ignore_eos=True)
    assert second.tokens == alone.tokens[0]
