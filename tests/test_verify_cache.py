"""The verified-once cache: unchanged files skip re-hashing; any change, a forged cache or an unsafe key does not."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import gpt2deploy
from gpt2deploy import verifycache
from gpt2deploy.errors import IntegrityError
from gpt2deploy.package import Package

GRAPH = Path("onnx") / "model.onnx"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv(verifycache.CACHE_DIR_ENV, str(d))
    monkeypatch.delenv(verifycache.ENABLE_ENV, raising=False)
    return d


@pytest.fixture
def settled(monkeypatch):
    """Files the test just wrote count as settled (the default waits SETTLE_NS after the last write)."""
    monkeypatch.setattr(verifycache, "SETTLE_NS", 0)


@pytest.fixture
def hash_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = verifycache.sha256_file

    def counting(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(verifycache, "sha256_file", counting)
    return calls


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _entries(cache_dir: Path) -> dict:
    return json.loads((cache_dir / verifycache.CACHE_NAME).read_text())["entries"]


@pytest.mark.timeout(300)
def test_second_load_skips_hashing_unchanged_files(package_copy, cache_dir, settled, hash_calls):
    gpt2deploy.load(package_copy, device="cpu")
    first = list(hash_calls)
    assert "model.onnx" in first and "tokenizer.json" in first
    assert len(_entries(cache_dir)) == len(first)
    key = cache_dir / verifycache.KEY_NAME
    assert key.stat().st_mode & 0o777 == 0o600
    hash_calls.clear()
    gpt2deploy.load(package_copy, device="cpu")
    assert hash_calls == []


@pytest.mark.timeout(300)
def test_modified_file_after_cached_verify_is_caught(package_copy, cache_dir, settled):
    gpt2deploy.load(package_copy, device="cpu")  # verified and remembered
    path = package_copy / GRAPH
    st = path.stat()
    _flip_byte(path)  # same size, same inode
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime put back (ctime moves)
    with pytest.raises(IntegrityError, match="model.onnx: sha256 differs"):
        gpt2deploy.load(package_copy, device="cpu")
    with pytest.raises(IntegrityError):
        Package.open(package_copy).check_integrity()


@pytest.mark.timeout(300)
def test_file_replaced_by_rename_after_cached_verify_is_caught(package_copy, cache_dir, settled, tmp_path):
    gpt2deploy.load(package_copy, device="cpu")
    path = package_copy / GRAPH
    other = tmp_path / "model.onnx"
    shutil.copy2(path, other)  # same size and mtime, another inode
    _flip_byte(other)
    st = path.stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, path)
    with pytest.raises(IntegrityError, match="model.onnx: sha256 differs"):
        gpt2deploy.load(package_copy, device="cpu")


@pytest.mark.timeout(300)
def test_forged_cache_entry_is_ignored(package_copy, cache_dir, settled):
    gpt2deploy.load(package_copy, device="cpu")
    path = package_copy / GRAPH
    _flip_byte(path)
    doc = json.loads((cache_dir / verifycache.CACHE_NAME).read_text())
    # An entry claiming the tampered file (its new identity) has the manifest's digest, without the key.
    expected = next(e["sha256"] for e in Package.open(package_copy).listed_files() if e["path"] == GRAPH.as_posix())
    doc["entries"][verifycache.identity(path, path.stat())] = [expected, 1]
    (cache_dir / verifycache.CACHE_NAME).write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="model.onnx: sha256 differs"):
        gpt2deploy.load(package_copy, device="cpu")


@pytest.mark.timeout(300)
def test_unsafe_key_disables_the_cache(package_copy, cache_dir, settled, hash_calls):
    gpt2deploy.load(package_copy, device="cpu")
    os.chmod(cache_dir / verifycache.KEY_NAME, 0o644)  # readable by others: entries cannot be trusted
    hash_calls.clear()
    gpt2deploy.load(package_copy, device="cpu")
    assert "model.onnx" in hash_calls


@pytest.mark.timeout(300)
def test_corrupt_cache_file_is_ignored(package_copy, cache_dir, settled, hash_calls):
    gpt2deploy.load(package_copy, device="cpu")
    (cache_dir / verifycache.CACHE_NAME).write_text("{not json")
    hash_calls.clear()
    assert gpt2deploy.load(package_copy, device="cpu").variant == "fp32"
    assert "model.onnx" in hash_calls
    assert _entries(cache_dir)  # rewritten, valid again


@pytest.mark.timeout(300)
def test_freshly_written_files_are_not_remembered(package_copy, cache_dir, hash_calls, monkeypatch):
    # Files changed within SETTLE_NS before hashing could change again in the same timestamp tick unseen:
    # nothing is kept. (An hour here, so a slow machine cannot make the fresh copy look settled.)
    monkeypatch.setattr(verifycache, "SETTLE_NS", 3600 * 10**9)
    gpt2deploy.load(package_copy, device="cpu")
    assert not (cache_dir / verifycache.CACHE_NAME).exists() or _entries(cache_dir) == {}
    hash_calls.clear()
    gpt2deploy.load(package_copy, device="cpu")
    assert "model.onnx" in hash_calls


@pytest.mark.timeout(300)
def test_cache_off_and_verify_command_always_hash(package_copy, cache_dir, settled, hash_calls, monkeypatch):
    monkeypatch.setenv(verifycache.ENABLE_ENV, "0")
    gpt2deploy.load(package_copy, device="cpu")
    assert not cache_dir.exists()
    monkeypatch.delenv(verifycache.ENABLE_ENV)
    gpt2deploy.load(package_copy, device="cpu")
    assert _entries(cache_dir)
    # 'gpt2deploy verify' (integrity_problems without remembered=True) reads every file, cache or not.
    import gpt2deploy.package as package_mod

    reads: list[str] = []
    real = package_mod.sha256_file
    monkeypatch.setattr(package_mod, "sha256_file", lambda p: reads.append(Path(p).name) or real(p))
    assert Package.open(package_copy).integrity_problems() == []
    assert "model.onnx" in reads


def test_cache_is_bounded(tmp_path, cache_dir, settled, monkeypatch):
    monkeypatch.setattr(verifycache, "MAX_ENTRIES", 3)
    cache = verifycache.VerifyCache()
    for i in range(6):
        f = tmp_path / f"f{i}"
        f.write_bytes(bytes([i]) * 10)
        cache.sha256(f)
    cache.save()
    assert len(_entries(cache_dir)) == 3


def test_unwritable_cache_dir_does_not_fail_a_load(package_copy, tmp_path, settled, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv(verifycache.CACHE_DIR_ENV, str(blocker / "cache"))  # a path under a file
    assert gpt2deploy.load(package_copy, device="cpu").variant == "fp32"
