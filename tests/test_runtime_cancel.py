"""Cancelling a stream: ``stream(..., cancel=Event)`` / ``TextStream.cancel()`` stop before the next step."""

from __future__ import annotations

import threading

import pytest

import gpt2deploy
from gpt2deploy.errors import UsageError

OPTS = dict(max_new_tokens=100, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_package):
    return gpt2deploy.load(tiny_package, device="cpu")


@pytest.mark.timeout(300)
def test_cancel_stops_before_the_next_token(model):
    s = model.stream("Hello there", **OPTS)
    pieces = []
    for piece in s:
        pieces.append(piece)
        if len(pieces) == 3:
            done = len(s.gen.tokens[0])
            s.cancel()
    assert s.cancelled
    assert s.result.finish_reasons == ["cancelled"]
    assert s.result.new_tokens == [done]  # no step ran after the cancel
    assert s.text == "".join(pieces)


@pytest.mark.timeout(300)
def test_cancel_from_another_thread(model):
    stop = threading.Event()
    started = threading.Event()
    out: list[str] = []

    def worker():
        for piece in model.stream("Once upon a time", cancel=stop, max_new_tokens=120, ignore_eos=True):
            out.append(piece)
            started.set()

    t = threading.Thread(target=worker)
    t.start()
    assert started.wait(30)
    stop.set()
    t.join(30)
    assert not t.is_alive()
    assert 1 <= len(out) < 120


@pytest.mark.timeout(300)
def test_already_set_cancel_gives_one_token_and_the_model_stays_ready(model):
    ev = threading.Event()
    ev.set()
    s = model.stream("Hello there", cancel=ev, **OPTS)
    list(s)
    assert s.result.finish_reasons == ["cancelled"] and s.result.new_tokens == [1]
    # the pooled KV cache went back: the next generation equals one on a fresh model
    again = model.generate("Hello there", max_new_tokens=12)
    fresh = gpt2deploy.load(model.package.root, device="cpu").generate("Hello there", max_new_tokens=12)
    assert again == fresh


def test_cancel_must_be_an_event(model):
    with pytest.raises(UsageError, match="cancel must be a threading.Event"):
        model.stream("Hi", cancel=True)
