"""Evaluation text: the default prose, user text files, tokenization and fixed windows.

The default text is the language-reference prose shipped with Python itself (``pydoc_data.topics``), so a check
needs no download. It is normalised (indentation and runs of spaces collapsed) and joined in sorted topic order,
so the same Python version always yields the same text; its sha256 is recorded with every report.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError

#: Window length in tokens (shorter when the model's context is shorter).
WINDOW = 128
#: Tokens evaluated by default: 32 windows of 128.
DEFAULT_MAX_TOKENS = 4096
#: Greedy continuation probe: prompts x tokens generated with cached decoding.
GREEDY_PROMPTS = 8
GREEDY_PROMPT_TOKENS = 16
GREEDY_NEW_TOKENS = 32


def default_text() -> tuple[str, str]:
    """(text, source) of the built-in evaluation text."""
    import pydoc_data.topics as topics

    parts = []
    for key in sorted(topics.topics):
        lines = (re.sub(r"[ \t]+", " ", line.strip()) for line in topics.topics[key].strip().splitlines())
        parts.append(re.sub(r"\n{3,}", "\n\n", "\n".join(lines)))
    version = ".".join(str(v) for v in sys.version_info[:3])
    return "\n\n".join(parts), f"pydoc_data.topics (Python {version})"


def read_text(path: str | Path) -> tuple[str, str]:
    """(text, source) of a UTF-8 text file; UsageError when it is missing, unreadable, binary or empty."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"text file {p} does not exist; pass an existing UTF-8 text file with --text")
    if p.is_dir():
        raise UsageError(f"--text {p} is a directory; pass a UTF-8 text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"text file {p} is not UTF-8 text; pass a UTF-8 text file with --text") from None
    except OSError as e:
        raise UsageError(f"cannot read text file {p} ({e.strerror or e}); check its permissions") from None
    if not text.strip():
        raise UsageError(f"text file {p} is empty; pass a file with at least one window of English text")
    return text, str(p)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def window_length(n_positions: int) -> int:
    return min(WINDOW, int(n_positions))


@dataclass(frozen=True)
class EvalText:
    """Tokenized evaluation text cut into non-overlapping windows."""

    source: str
    sha256: str
    windows: np.ndarray  # [n_windows, window] int64

    @property
    def tokens(self) -> int:
        return int(self.windows.size)

    @property
    def stream(self) -> np.ndarray:
        return self.windows.reshape(-1)

    def identity(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "tokens": self.tokens}

    def greedy_prompts(self, n_positions: int) -> tuple[np.ndarray, int]:
        """(prompts [n, p], new tokens) for the greedy continuation probe, spread evenly over the text."""
        p = min(GREEDY_PROMPT_TOKENS, max(1, n_positions // 4))
        new = min(GREEDY_NEW_TOKENS, n_positions - p)
        stream = self.stream
        n = GREEDY_PROMPTS
        starts = np.linspace(0, stream.size - p, n).astype(np.int64)
        return np.stack([stream[s : s + p] for s in starts]), new


def tokenize(text: str, source: str, tokenizer_path: str | Path, n_positions: int, max_tokens: int | None) -> EvalText:
    """Tokenize ``text`` with the package tokenizer and cut it into windows of ``window_length`` tokens."""
    from tokenizers import Tokenizer

    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    window = window_length(n_positions)
    if max_tokens < window:
        raise UsageError(
            f"--max-tokens {max_tokens} is shorter than one window ({window} tokens); pass at least {window}"
        )
    tok = Tokenizer.from_file(str(tokenizer_path))
    need = (max_tokens // window) * window
    ids = _encode_prefix(tok, text, need)
    n_windows = min(len(ids) // window, max_tokens // window)
    if n_windows < 1:
        raise UsageError(
            f"the evaluation text ({source}) has {len(ids)} tokens, shorter than one window of {window}; pass a "
            "longer --text"
        )
    windows = np.asarray(ids[: n_windows * window], dtype=np.int64).reshape(n_windows, window)
    return EvalText(source=source, sha256=text_sha256(text), windows=windows)


def _encode_prefix(tok, text: str, need: int) -> list[int]:
    """Token ids of a prefix of ``text`` holding at least ``need`` tokens (the whole text if it is shorter).

    Huge files are not tokenized whole: a growing character prefix is encoded, and the last token (which
    may be cut mid-word) is dropped unless the prefix is the whole text.
    """
    chars = max(4096, need * 8)
    while True:
        whole = chars >= len(text)
        ids = tok.encode(text if whole else text[:chars], add_special_tokens=False).ids
        if whole:
            return ids
        ids = ids[:-1]
        if len(ids) >= need:
            return ids
        chars *= 2
