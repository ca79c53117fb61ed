"""Token ids -> text, incrementally: whole characters only, and stop strings that cut cleanly.

GPT-2's byte-level BPE can split one UTF-8 character (an emoji, an accented letter) across tokens, so
decoding token by token would print replacement characters. ``IncrementalText`` turns each token into
its bytes and holds back an incomplete trailing character until the bytes that finish it arrive.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable


def _byte_level_table() -> dict[str, int]:
    """GPT-2's printable stand-in character -> byte (the inverse of ``bytes_to_unicode``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=False)}


class TokenBytes:
    """``bytes_of(id)``: the exact bytes a token contributes to the text (special tokens contribute none)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_level = type(tokenizer.decoder).__name__ == "ByteLevel"
        self._table = _byte_level_table()
        self._cache: dict[int, bytes] = {}
        self._added: dict[int, bytes] = {}
        for tid, tok in tokenizer.get_added_tokens_decoder().items():
            self._added[tid] = b"" if tok.special else tok.content.encode("utf-8")

    def bytes_of(self, token_id: int) -> bytes:
        b = self._cache.get(token_id)
        if b is None:
            if token_id in self._added:
                b = self._added[token_id]
            else:
                piece = self.tokenizer.id_to_token(token_id)
                table = self._table
                b = b"" if piece is None else bytes(table[c] if c in table else 0x3F for c in piece)
            self._cache[token_id] = b
        return b


class IncrementalText:
    """Feed token ids one at a time; get back the text they complete (possibly ""), then ``flush()``."""

    def __init__(self, token_bytes: TokenBytes):
        self.tb = token_bytes
        if token_bytes.byte_level:
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        else:
            self._utf8 = None
            self._ids: list[int] = []
            self._emitted = 0

    def feed(self, token_id: int) -> str:
        if self._utf8 is not None:
            return self._utf8.decode(self.tb.bytes_of(token_id))
        # Tokenizers without a byte-level decoder: decode the whole sequence, emit the stable new part.
        self._ids.append(token_id)
        text = self.tb.tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[self._emitted :]
        self._emitted = len(text)
        return piece

    def flush(self) -> str:
        if self._utf8 is not None:
            return self._utf8.decode(b"", final=True)
        text = self.tb.tokenizer.decode(self._ids)
        piece = text[self._emitted :]
        self._emitted = len(text)
        return piece


def decode(token_bytes: TokenBytes, ids: Iterable[int]) -> str:
    inc = IncrementalText(token_bytes)
    return "".join(inc.feed(i) for i in ids) + inc.flush()


class StopMatcher:
    """Cuts generated text before the first stop string.

    ``feed(piece) -> (text safe to emit, stopped)``. Text that could be the start of a stop string is held
    back until it is known not to be one, so streamed output never shows part of a stop string.
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return piece, False
        text = self._held + piece
        cut = -1
        for s in self.stops:
            i = text.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut = i
        if cut != -1:
            self._held = ""
            self.stopped = True
            return text[:cut], True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held
