"""Filesystem helpers: hashing, atomic writes and staged output directories."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import UsageError

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """Write JSON next to ``path`` then rename over it, so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_output_dir(out: str | os.PathLike, force: bool) -> Path:
    """Validate an output directory before any work is done.

    Refuses a non-empty directory unless ``force``, a path that is a file, and a parent that cannot
    be written.
    """
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path {out} is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"output directory {out} exists and is not empty; pass --force to replace it")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {parent}; choose an output directory you can write")
    return out


def check_writable_dir(path: str | os.PathLike, why: str) -> None:
    """UsageError unless a file can be created in directory ``path`` (tried: mode bits do not bind root,
    read-only mounts do), so a command refuses before its work rather than after."""
    path = Path(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=stage_prefix("probe"), dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(
            f"cannot write to {path} ({e.strerror or e}); {why}: make it writable or work on a copy"
        ) from None


def _host() -> str:
    return "".join(c if c.isalnum() or c == "-" else "_" for c in socket.gethostname()) or "host"


def stage_prefix(kind: str) -> str:
    """``.KIND.HOST.PID.``: the start of a staging name, so a later run can tell whether its writer still runs."""
    return f".{kind}.{_host()}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale_stages(parent: str | os.PathLike, kind: str) -> list[Path]:
    """Remove ``parent``'s staging entries of ``kind`` left by runs that were killed (SIGKILL, power loss).

    Only entries written on this host by a process that no longer exists are removed, and never a staged
    directory holding ``previous-*`` backups (files a killed commit moved aside, kept for recovery).
    Returns what was removed.
    """
    parent = Path(parent)
    head, host, removed = f".{kind}.", _host(), []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        name = p.name
        if not (name.startswith(head) and name.endswith(".partial")):
            continue
        parts = name[len(head) : -len(".partial")].split(".")
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit() or _alive(int(parts[1])):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                if any(p.glob("previous-*")):
                    continue
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:
            continue
        removed.append(p)
    return removed


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it replaces ``out`` in one rename.

    On any exception the temporary directory is removed and ``out`` is left as it was.
    """
    out = Path(out).absolute()
    created = _make_parents(out.parent)
    sweep_stale_stages(out.parent, out.name)
    tmp = Path(tempfile.mkdtemp(prefix=stage_prefix(out.name), suffix=".partial", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # the directories made for ``out``, innermost first, if still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _make_parents(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the directories it created, innermost first."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return missing


@contextlib.contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_stages(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=stage_prefix(path.name), suffix=".partial", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def staging_dir(parent: str | os.PathLike, kind: str) -> Iterator[Path]:
    """A temporary directory inside ``parent`` (same filesystem, so renames out of it are atomic), removed after.

    Stale stages of ``kind`` left by killed runs are swept first (``sweep_stale_stages``).
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_stages(parent, kind)
    tmp = Path(tempfile.mkdtemp(prefix=stage_prefix(kind), suffix=".partial", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_files(root: Path, stage: Path, written: list[Path], files: list[str], old_files: list[str], record):
    """Move the staged ``written`` files to ``root / files`` and return ``record()``; on any failure restore.

    ``old_files`` (relative to ``root``) are what the new files replace: they are moved aside into ``stage``
    as ``previous-NAME`` first, and moved back if a rename or ``record`` fails (``sweep_stale_stages`` never
    deletes a stage holding such backups).
    """
    targets = {root / f for f in files} | {root / f for f in old_files}
    backups: dict[Path, Path] = {}
    moved: list[Path] = []
    try:
        for target in targets:
            if target.exists():
                backup = stage / f"previous-{target.name}"
                os.replace(target, backup)
                backups[target] = backup
        for src, rel in zip(written, files, strict=False):
            os.replace(src, root / rel)
            moved.append(root / rel)
        return record()
    except BaseException:
        for path in moved:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for target, backup in backups.items():
            os.replace(backup, target)
        raise
