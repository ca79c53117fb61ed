"""Incremental detokenization (multi-byte characters split across tokens) and stop-string matching."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TOKENIZER_DIR
from tokenizers import Tokenizer

from gpt2deploy.runtime.textstream import IncrementalText, StopMatcher, TokenBytes, decode


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def tb(tok):
    return TokenBytes(tok)


def _pieces(tb, ids):
    inc = IncrementalText(tb)
    return [inc.feed(i) for i in ids] + [inc.flush()]


def test_emoji_split_across_tokens_is_held_back(tok, tb):
    ids = tok.encode(" 😀").ids
    assert len(ids) == 2  # byte-level BPE splits the 4-byte emoji over two tokens
    assert tb.bytes_of(ids[0]) + tb.bytes_of(ids[1]) == " 😀".encode()
    inc = IncrementalText(tb)
    assert inc.feed(ids[0]) == " "  # the space is complete, the emoji's first bytes are held
    assert inc.feed(ids[1]) == "😀"
    assert inc.flush() == ""


@pytest.mark.parametrize("text", ["héllo naïve café", "日本語のテキスト", "🎉🎉 ok ✓ 👩‍💻", "Ünïcödé → ∑ ≠ ∞"])
def test_pieces_are_whole_characters_and_join_to_text(tok, tb, text):
    ids = tok.encode(text).ids
    pieces = _pieces(tb, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_byte_decoding_equals_tokenizer_decode_on_random_ids(tok, tb):
    """Random ids produce invalid UTF-8 too: the replacement characters match the tokenizer's own decode."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = rng.integers(0, tok.get_vocab_size(), size=int(rng.integers(1, 25))).tolist()
        assert decode(tb, ids) == tok.decode(ids)
        assert "".join(_pieces(tb, ids)) == tok.decode(ids)


def test_special_tokens_contribute_no_text(tok, tb):
    ids = tok.encode("a<|endoftext|>b").ids
    assert 50256 in ids
    assert decode(tb, ids) == "ab" == tok.decode(ids)


def test_non_byte_level_tokenizer_falls_back_to_full_decode():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.decoder = decoders.WordPiece()
    tb = TokenBytes(t)
    assert not tb.byte_level
    assert "".join(_pieces(tb, [0, 1, 0])) == t.decode([0, 1, 0])


def _stop_run(stops, pieces):
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        text, stopped = m.feed(p)
        out.append(text)
        if stopped:
            return out, True
    out.append(m.flush())
    return out, False


def test_stop_string_split_over_pieces():
    out, stopped = _stop_run(["END"], ["Hello E", "N", "D and more"])
    assert stopped and "".join(out) == "Hello "
    assert out[0] == "Hello "  # "E" held back: it could start the stop string
    assert out[1] == ""


def test_false_start_of_stop_is_released():
    out, stopped = _stop_run(["END"], ["Hello E", "NX", " done"])
    assert not stopped and "".join(out) == "Hello ENX done"
    assert out[1] == "ENX"


def test_earliest_of_several_stops_wins_and_flush_returns_tail():
    out, stopped = _stop_run(["\n\n", "B"], ["aaB", "b\n\n"])
    assert stopped and "".join(out) == "aa"
    out, stopped = _stop_run(["xyz"], ["abc x", "y"])
    assert not stopped and "".join(out) == "abc xy" and out[-1] == "xy"


def test_stop_inside_one_piece_and_at_start():
    assert _stop_run(["."], ["one. two."]) == (["one"], True)
    assert _stop_run(["one"], ["one two"]) == ([""], True)
    assert _stop_run([], ["abc"]) == (["abc", ""], False)
