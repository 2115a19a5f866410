"""Bad input and a hostile or full filesystem under the POSIX tier: every error is typed and
names the key and the file, a batch fails only the keys that failed, and nothing is lost."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.kvstore.contract import pattern
from tests.kvstore.test_posix import config
from weft.fabric.errors import ConfigError
from weft.kvstore import (
    BatchError,
    InvalidBufferError,
    InvalidKeyError,
    KVStore,
    StorageError,
    StorageFullError,
    load_lmcache_config,
)
from weft.kvstore.posix import _path


@contextlib.contextmanager
def _tmpfs(where: Path, *options: str) -> Iterator[Path]:
    """A small tmpfs of our own (root only), unmounted after; skips where mounting is refused."""
    where.mkdir()
    opts = ",".join(options)
    got = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], check=False, capture_output=True
    )
    if got.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({got.stderr.decode().strip()}): the injected ENOSPC test covers it"
        )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_int_and_bytes_keys_are_lmcache_chunk_hashes_in_hex(tmp_path: Path) -> None:
    """LMCache names chunks by int hashes and writes them in hex (`chunk_hash_hex`)."""
    chunk_hash = 0x1F2E3D4C5B6A79880011223344556677
    with KVStore.from_lmcache_config(config(tmp_path)) as kv:
        kv.put(chunk_hash, b"kv of 256 tokens")
        assert kv.get(chunk_hash) == b"kv of 256 tokens"
        assert kv.get(f"{chunk_hash:x}") == b"kv of 256 tokens"  # one chunk, two spellings
        assert kv.get(chunk_hash.to_bytes(16, "big")) == b"kv of 256 tokens"
        assert kv.contains(chunk_hash) and _path(tmp_path, f"{chunk_hash:x}").is_file()
        kv.put_many({1: b"one", 2: b"two"})
        assert kv.get_many([1, 2, 3]) == [b"one", b"two", None]
        into = np.zeros(16, np.uint8)
        assert kv.get(-5, into) is False  # any int, negative ones too
        assert kv.delete(1) and not kv.contains(1)
        bads: tuple[Any, ...] = (1.5, None, True, ("a",), object())
        for bad in bads:
            with pytest.raises(InvalidKeyError, match="a str, an int or bytes"):
                kv.put(bad, b"x")
            with pytest.raises(InvalidKeyError):
                kv.get(bad)
        with pytest.raises(InvalidKeyError, match="longer than 4096"):
            kv.put("k" * 5000, b"x")


def test_a_single_str_where_keys_are_expected_is_refused(tmp_path: Path) -> None:
    with KVStore.from_lmcache_config(config(tmp_path)) as kv:
        kv.put_many({"a": b"1", "b": b"2", "c": b"3", "abc": b"4"})
        for single in ("abc", b"abc"):
            with pytest.raises(InvalidKeyError, match="takes a sequence of keys"):
                kv.get_many(single)
        with pytest.raises(InvalidKeyError, match="takes a sequence of keys"):
            kv.get_many(7)  # type: ignore[arg-type]
        assert kv.get_many(["abc"]) == [b"4"]
        with pytest.raises(InvalidBufferError, match="sequence of buffers"):
            kv.get_many(["a"], into=(np.zeros(4, np.uint8) for _ in range(1)))  # type: ignore[arg-type]
        for not_pairs in ("ab", ["abc"], [("a", b"1", "extra")], 5):
            with pytest.raises(InvalidKeyError, match="put_many takes"):
                kv.put_many(not_pairs)  # type: ignore[arg-type]
        assert kv.get_many(["a", "b", "c"]) == [b"1", b"2", b"3"]  # nothing above stored a byte


def test_read_only_and_short_buffers_are_typed_and_name_the_key(tmp_path: Path) -> None:
    with KVStore.from_lmcache_config(config(tmp_path)) as kv:
        kv.put("chunk-7", pattern(5000, 7))
        frozen = np.zeros(5000, np.uint8)
        frozen.flags.writeable = False
        for ro in (bytes(5000), frozen, memoryview(bytearray(5000)).toreadonly()):
            with pytest.raises(InvalidBufferError, match="chunk 'chunk-7' is read-only"):
                kv.get("chunk-7", into=ro)
        short = np.full(100, 7, np.uint8)
        with pytest.raises(
            InvalidBufferError, match=r"chunk 'chunk-7' at .*\.kv is smaller than the chunk \(5000\)"
        ):
            kv.get("chunk-7", into=short)
        assert (short == 7).all()  # refused before a byte was read
        with pytest.raises(BatchError) as info:
            kv.get_many(["chunk-7", "absent"], into=[short, np.zeros(10, np.uint8)])
        assert list(info.value.errors) == ["chunk-7"] and info.value.results == [False, False]
        assert isinstance(info.value.errors["chunk-7"], InvalidBufferError)
        with pytest.raises(InvalidBufferError, match="2 keys but 1 buffers"):
            kv.get_many(["chunk-7", "x"], into=[short])
        assert kv.get("chunk-7") == pattern(5000, 7).tobytes()  # nothing above touched it


def test_a_miss_leaves_into_untouched_and_a_corrupt_chunk_zeroes_it(tmp_path: Path) -> None:
    with KVStore.from_lmcache_config(config(tmp_path)) as kv:
        into = np.full(70_000, 0x55, np.uint8)
        assert kv.get("absent", into=into) is False
        assert (into == 0x55).all()  # no chunk: untouched
        kv.put("flipped", pattern(60_000, 1))
        path = _path(tmp_path, "flipped")
        raw = bytearray(path.read_bytes())
        raw[4096 + 30_000] ^= 0xFF  # a byte of the data: read into `into`, then caught
        path.write_bytes(bytes(raw))
        assert kv.get("flipped", into=into) is False
        assert not into.any()  # corrupt: zeroed, never the unchecked bytes
        into[:] = 0x55
        assert kv.get_many(["flipped", "absent"], into=[into, np.full(8, 3, np.uint8)]) == [False, False]
        assert not into.any()
        assert kv.corrupt_chunks == 2


def test_a_directory_or_an_extended_file_fails_only_its_own_key(tmp_path: Path) -> None:
    with KVStore.from_lmcache_config(config(tmp_path)) as kv:
        items = {f"k{i}": pattern(300_000, i) for i in range(6)}
        kv.put_many(items)
        _path(tmp_path, "dir").mkdir()  # a directory where a chunk should be
        with pytest.raises(StorageError, match=r"cannot open chunk 'dir' at .*\.kv: Is a directory") as one:
            kv.get("dir")
        assert one.value.key == "dir" and one.value.path == str(_path(tmp_path, "dir"))
        with pytest.raises(StorageError, match="chunk 'dir'"):
            kv.put("dir", b"x")
        with pytest.raises(StorageError, match="chunk 'dir'"):
            kv.delete("dir")
        assert not kv.contains("dir")
        with _path(tmp_path, "k2").open("ab") as f:
            f.write(bytes(8 << 20))  # extended: its length no longer matches its header
    # a handle kept open may still read the chunk as it was (its exact bytes); a new store
    # sees only the file
    with KVStore.from_lmcache_config(config(tmp_path)) as kv:
        for into in (None, [np.zeros(300_000, np.uint8) for _ in range(7)]):
            with pytest.raises(BatchError) as batch:
                kv.get_many([*items, "dir"], into=into)
            assert list(batch.value.errors) == ["dir"]
            results = batch.value.results
            if into is None:
                assert results[2] is None  # the extended chunk: a miss
                assert all(results[i] == items[f"k{i}"].tobytes() for i in (0, 1, 3, 4, 5))
            else:
                assert results == [True, True, False, True, True, True, False]
                assert all(np.array_equal(into[i], items[f"k{i}"]) for i in (0, 1, 3, 4, 5))
        assert kv.get("k2", into=np.zeros(300_000, np.uint8)) is False  # not "buffer too small"
        with pytest.raises(BatchError) as puts:
            kv.put_many({"dir": b"x", "new": b"stored"})
        assert list(puts.value.errors) == ["dir"] and puts.value.results == [False, None]
        assert kv.get("new") == b"stored"


def test_an_unusable_nixl_path_or_a_binary_config_is_typed(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_bytes(b"x")
    for where in (a_file, a_file / "below"):
        with pytest.raises(StorageError, match=f"nixl_path '{where}' cannot hold the KV store"):
            KVStore.from_lmcache_config(config(where))
    binary = tmp_path / "lmcache-config.yaml"
    binary.write_bytes(os.urandom(2000) + b"\x00")
    with pytest.raises(ConfigError, match="not YAML"):
        load_lmcache_config(binary)
    # root ignores modes: a read-only mount is what refuses it
    with (
        _tmpfs(tmp_path / "ro", "ro", "size=64k") as ro,
        pytest.raises(StorageError, match="Read-only file system"),
    ):
        KVStore.from_lmcache_config(config(ro / "kv"))


def _fill(kv: KVStore, size: int) -> int:
    """Store chunks until the disk is full; how many fitted."""
    n = 0
    while True:
        try:
            kv.put(f"fill-{n}", pattern(size, n))
        except StorageFullError as exc:
            assert f"chunk 'fill-{n}'" in str(exc) and "No space left" in str(exc)
            return n
        n += 1
        assert n < 10_000


def _check_full_disk(kv: KVStore, root: Path) -> None:
    """What a full disk may cost: the chunk being written, never another or an old copy."""
    with pytest.raises(StorageFullError, match=r"'old'.*the copy it held before is intact"):
        kv.put("old", pattern(900_000, 9))  # larger than the old one: needs new space
    assert kv.get("old") == pattern(50_000, 1).tobytes()
    kv.put("old", pattern(50_000, 2))  # no longer than before: needs none, works while full
    assert kv.get("old") == pattern(50_000, 2).tobytes()
    with pytest.raises(StorageFullError, match=r"'brand-new'.*not stored"):
        kv.put("brand-new", pattern(900_000, 3))
    assert not _path(root, "brand-new").exists() and kv.get("brand-new") is None
    with pytest.raises(BatchError) as batch:
        kv.put_many([("big", pattern(900_000, 4)), ("old", pattern(50_000, 5))])
    assert list(batch.value.errors) == ["big"] and isinstance(batch.value.errors["big"], StorageFullError)
    assert kv.get("old") == pattern(50_000, 5).tobytes()
    assert kv.corrupt_chunks == 0


def test_a_full_tmpfs_keeps_the_old_copy(tmp_path: Path) -> None:
    where = tmp_path / f"full-{uuid.uuid4().hex[:6]}"
    with _tmpfs(where, "size=1m") as root, KVStore.from_lmcache_config(config(root / "kv", pool=4)) as kv:
        kv.put("old", pattern(50_000, 1))
        assert _fill(kv, 60_000) > 3
        _check_full_disk(kv, root / "kv")


def test_an_injected_enospc_keeps_the_old_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same on any filesystem: the reservation fails as a full disk makes it fail."""
    real = os.posix_fallocate

    def fallocate(fd: int, offset: int, length: int) -> Any:
        if offset + length > 800_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    with KVStore.from_lmcache_config(config(tmp_path / "kv", pool=4)) as kv:
        kv.put("old", pattern(50_000, 1))
        _check_full_disk(kv, tmp_path / "kv")
