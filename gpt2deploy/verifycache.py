"""Verified-once cache: skip re-hashing package files that have not changed since their sha256 was computed.

Loading a package checks the sha256 of every file it uses; for a large variant that pass costs as much as
the load itself. This module remembers, per file, the digest computed for an exact on-disk identity —
(real path, device, inode, size, mtime_ns, ctime_ns) — and returns it while that identity is unchanged.
Any write to the file, a rename over it or a copy gives a new mtime, ctime or inode, so the file is hashed
again; ``ctime`` cannot be set from user space, so restoring the old mtime after a modification does not
bring the old entry back. A file whose timestamps are within ``SETTLE_NS`` of the time it was hashed is not
remembered (a write in the same timestamp tick would be invisible: the "racy clean" case).

The cache is one JSON file in the user's cache directory (``$GPT2DEPLOY_CACHE_DIR``, else
``$XDG_CACHE_HOME/gpt2deploy``, else ``~/.cache/gpt2deploy``), authenticated with HMAC-SHA256 under a random
key kept beside it with mode 0600. A cache that fails its MAC, cannot be parsed, or whose key is readable by
others or owned by another user is ignored (every file is hashed). The MAC guards against corruption and
against entries not written by this module; anyone able to write the user's cache directory can already
change what the user runs. ``GPT2DEPLOY_VERIFY_CACHE=0`` turns the cache off. At most ``MAX_ENTRIES``
entries are kept (the oldest dropped first). Errors writing the cache never fail a load.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import time
from pathlib import Path

from .fsutil import sha256_file

CACHE_DIR_ENV = "GPT2DEPLOY_CACHE_DIR"
ENABLE_ENV = "GPT2DEPLOY_VERIFY_CACHE"
CACHE_NAME = "verified-files.json"
KEY_NAME = "verified-files.key"
MAX_ENTRIES = 512
#: Files changed less than this before they were hashed are not remembered (timestamp granularity).
SETTLE_NS = 2_000_000_000
_VERSION = 1
_MAX_CACHE_BYTES = 1 << 20


def cache_dir() -> Path:
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gpt2deploy"


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def identity(path: Path, st: os.stat_result) -> str:
    """The on-disk identity a cached digest is valid for."""
    return f"{os.path.realpath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


class VerifyCache:
    """The cache file of one directory: ``lookup`` / ``remember`` digests, ``save`` when changed."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.dir = Path(directory) if directory is not None else cache_dir()
        self.entries: dict[str, list] = {}  # identity -> [sha256, verified_at_ns]
        self.changed = False
        self._key = self._read_key(create=False)
        if self._key is not None:
            self.entries = self._read_entries()

    # -- key and file ---------------------------------------------------------------------------
    def _read_key(self, create: bool) -> bytes | None:
        path = self.dir / KEY_NAME
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return self._create_key(path) if create else None
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o077):
                return None  # another user's key, or one others can read: do not trust this cache
            key = f.read(64)
        return key if len(key) == 32 else None

    def _create_key(self, path: Path) -> bytes | None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=".key.", dir=self.dir)
            try:
                key = secrets.token_bytes(32)
                os.write(fd, key)
                os.close(fd)
                os.link(tmp, path)  # atomic and never replaces a key another process created first
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        except FileExistsError:
            return self._read_key(create=False)
        except OSError:
            return None
        return key

    def _mac(self, body: bytes) -> str:
        assert self._key is not None
        return hmac.new(self._key, body, hashlib.sha256).hexdigest()

    def _read_entries(self) -> dict[str, list]:
        try:
            with open(self.dir / CACHE_NAME, "rb") as f:
                raw = f.read(_MAX_CACHE_BYTES + 1)
            if len(raw) > _MAX_CACHE_BYTES:
                return {}
            doc = json.loads(raw)
            body = json.dumps(doc["entries"], sort_keys=True, separators=(",", ":")).encode()
            if doc.get("version") != _VERSION or not hmac.compare_digest(str(doc.get("mac")), self._mac(body)):
                return {}
            entries = doc["entries"]
            if not isinstance(entries, dict):
                return {}
            return {
                k: v
                for k, v in entries.items()
                if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)
            }
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def save(self) -> None:
        """Write the cache atomically if it changed; failures (read-only home, full disk) are ignored."""
        if not self.changed:
            return
        if self._key is None:
            self._key = self._read_key(create=True)
            if self._key is None:
                return
        newest = sorted(self.entries.items(), key=lambda kv: kv[1][1], reverse=True)[:MAX_ENTRIES]
        entries = dict(newest)
        body = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
        doc = {"version": _VERSION, "mac": self._mac(body), "entries": entries}
        try:
            fd, tmp = tempfile.mkstemp(prefix=".verified.", suffix=".tmp", dir=self.dir)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(doc, f, sort_keys=True, separators=(",", ":"))
                os.replace(tmp, self.dir / CACHE_NAME)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError:
            return
        self.changed = False

    # -- digests --------------------------------------------------------------------------------
    def sha256(self, path: str | os.PathLike) -> str:
        """The file's sha256: remembered if its identity is unchanged since it was hashed, else computed."""
        path = Path(path)
        before = os.stat(path)
        ident = identity(path, before)
        hit = self.entries.get(ident)
        if hit is not None:
            return hit[0]
        started = time.time_ns()
        digest = sha256_file(path)
        after = os.stat(path)
        settled = started - max(after.st_mtime_ns, after.st_ctime_ns) >= SETTLE_NS
        if settled and identity(path, after) == ident:  # unchanged while it was read, and not racily new
            self.entries[ident] = [digest, time.time_ns()]
            self.changed = True
        return digest


def open_cache() -> VerifyCache | None:
    """The user's verify cache, or None when ``GPT2DEPLOY_VERIFY_CACHE=0`` turns it off."""
    return VerifyCache() if enabled() else None
