"""The POSIX tier: round trips, batches, a killed writer, a flipped byte."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from tests.kvstore.contract import check_round_trip, pattern
from weft import fabric
from weft.fabric.errors import DeviceUnavailableError, InvalidBufferError
from weft.kvstore import KVStore
from weft.kvstore.posix import _path


def config(root: Path, pool: int = 8) -> dict[str, Any]:
    return {
        "chunk_size": 256,
        "nixl_buffer_size": 1 << 20,
        "nixl_buffer_device": "cpu",
        "extra_config": {
            "enable_nixl_storage": True,
            "nixl_backend": "POSIX",
            "nixl_pool_size": pool,
            "nixl_path": str(root),
        },
    }


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 65537, 1 << 20, (8 << 20) + 3])
def test_round_trips_of_many_sizes(tmp_path: Path, size: int) -> None:
    with KVStore.from_lmcache_config(config(tmp_path)) as kv:
        check_round_trip(kv, size)


def test_batches_and_overwrite(tmp_path: Path) -> None:
    with KVStore.from_lmcache_config(config(tmp_path)) as kv:
        items = {f"k{i}": pattern(256 << 10, i) for i in range(64)}
        kv.put_many(items)
        got = kv.get_many(list(items))
        assert all(g == d.tobytes() for g, d in zip(got, items.values(), strict=True))
        intos = [np.zeros(256 << 10, np.uint8) for _ in items]
        assert kv.get_many([*items, "nope"][:64], into=intos) == [True] * 64
        kv.put("k0", b"new")
        assert kv.get("k0") == b"new"
        with pytest.raises(InvalidBufferError, match="smaller than the chunk"):
            kv.get("k1", into=np.zeros(10, np.uint8))


def test_a_flipped_byte_reads_as_a_miss_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with KVStore.from_lmcache_config(config(tmp_path)) as kv:
        kv.put("victim", pattern(100_000, 1))
        path = _path(tmp_path, "victim")
        raw = bytearray(path.read_bytes())
        raw[50_000] ^= 0x01
        path.write_bytes(raw)
        with caplog.at_level(logging.WARNING, logger="weft.kvstore"):
            assert kv.get("victim") is None
        assert kv.corrupt_chunks == 1 and any("checksum mismatch" in r.message for r in caplog.records)
        kv.put("short", pattern(10_000, 2))
        path = _path(tmp_path, "short")
        path.write_bytes(path.read_bytes()[:5000])  # a torn file, however it came about
        assert kv.get("short") is None and kv.corrupt_chunks == 2


WRITER = """
import sys, numpy as np
from weft.kvstore import KVStore
kv = KVStore.from_lmcache_config({cfg!r})
bases = [np.random.default_rng(p).integers(0, 256, 16 << 20, dtype=np.uint8) for p in (0, 1)]
for i in range(10**6):
    data = bases[i % 2]  # made once: the loop's time goes to writing, where the kill lands
    data[::4096] = i & 0xFF  # every page differs from the version before under this key
    data[:8] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)  # which version this is
    kv.put(f"w{{i % 8}}", data)
    print(i, flush=True)
"""


@functools.cache
def writer_base(seed: int) -> np.ndarray:
    """The writer's two bases, made once here too (80 reads check against them)."""
    return pattern(16 << 20, seed)


def version_of(got: bytes) -> int:
    """The writer's iteration a chunk came from, checked against its whole content."""
    i = int.from_bytes(got[:8], "little")
    expected = writer_base(i % 2).copy()
    expected[::4096] = i & 0xFF
    assert got[8:] == expected.tobytes()[8:], f"chunk of version {i} has wrong bytes"
    return i


@pytest.mark.integration
def test_a_writer_killed_mid_write_never_leaves_a_torn_chunk(tmp_path: Path) -> None:
    cfg = config(tmp_path / "kv")
    code = WRITER.format(cfg=cfg)
    torn = 0
    for delay in (0.1, 0.35, 0.2, 0.5, 0.15, 0.3, 0.45, 0.25, 0.4, 0.6):  # about half land mid-put
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=dict(os.environ))
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one chunk is whole on disk
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        with KVStore.from_lmcache_config(cfg) as kv:
            for i in range(8):
                got = kv.get(f"w{i}")
                assert got is None or version_of(got) % 8 == i
            torn += kv.corrupt_chunks  # a chunk cut mid-write: caught by its checksum
    assert torn >= 1  # the kills did land inside writes, and what they left never read as data


def test_a_large_chunk_over_two_lanes_and_a_flip_in_a_late_segment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    size = (17 << 20) + 5  # five segments, the last one short
    with KVStore.from_lmcache_config(config(tmp_path), lanes=2) as kv:
        data = pattern(size, 7)
        kv.put("big", data)
        into = np.empty(size, np.uint8)
        assert kv.get("big", into=into) and np.array_equal(into, data)
        path = _path(tmp_path, "big")
        with path.open("r+b") as f:
            f.seek(4096 + (13 << 20) + 11)  # inside segment 3
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x80]))
        with caplog.at_level(logging.WARNING, logger="weft.kvstore"):
            assert kv.get("big", into=into) is False
        assert any("segment 3" in r.message for r in caplog.records)


@pytest.mark.parametrize("size", [4096, 1 << 20, (9 << 20) + 4096, (9 << 20) + 7])
def test_o_direct_round_trips(tmp_path: Path, size: int) -> None:
    """Aligned buffers move with O_DIRECT (where the filesystem has it), the rest buffered."""
    with KVStore.from_lmcache_config(config(tmp_path), direct=True) as kv:
        data = pattern(size, size)
        kv.put("d", data)
        into = np.empty(size, np.uint8)
        assert kv.get("d", into=into) and np.array_equal(into, data)
        assert kv.get("d") == data.tobytes()
        assert kv._tier.direct == _has_o_direct(tmp_path)  # not quietly dropped where it works


def _has_o_direct(where: Path) -> bool:
    try:
        os.close(os.open(where / "probe", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600))
        return True
    except OSError:
        return False


def test_a_kept_handle_sees_another_writer_and_handles_do_not_leak(tmp_path: Path) -> None:
    open_fds = len(os.listdir("/proc/self/fd"))
    with (
        KVStore.from_lmcache_config(config(tmp_path, pool=2)) as a,
        KVStore.from_lmcache_config(config(tmp_path)) as b,
    ):
        a.put("k", pattern(1 << 20, 1))
        assert a.get("k") == pattern(1 << 20, 1).tobytes()  # a keeps k's file open
        b.put("k", b"short now")  # rewritten in place and shortened by another store
        assert a.get("k") == b"short now"
        for i in range(10):  # more keys than a keeps open: the oldest are closed
            a.put(f"e{i}", pattern(1000, i))
        assert [a.get(f"e{i}") for i in range(10)] == [pattern(1000, i).tobytes() for i in range(10)]
        assert b.delete("e9") and not a.contains("e9")
    assert len(os.listdir("/proc/self/fd")) == open_fds


@pytest.mark.skipif(fabric.gpu_available(), reason="checks the refusal on a machine without a GPU")
def test_a_device_buffer_without_a_gpu_is_refused_typed(tmp_path: Path) -> None:
    class FakeDevice:
        __cuda_array_interface__: ClassVar[dict[str, Any]] = {
            "shape": (16,),
            "typestr": "|u1",
            "data": (1 << 40, False),
            "version": 3,
        }

    with KVStore.from_lmcache_config(config(tmp_path)) as kv:
        with pytest.raises(DeviceUnavailableError):
            kv.put("dev", FakeDevice())
        with pytest.raises(DeviceUnavailableError):
            kv.get("dev", into=FakeDevice())


READER = """
import json, sys, time, numpy as np
from weft.kvstore import KVStore
kv = KVStore.from_lmcache_config({cfg!r})
sizes = {sizes!r}
bases = {{k: np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8) for k, n in sizes.items()}}
hits = misses = wrong = 0
print("ready", flush=True)
deadline = time.monotonic() + 2.0
while time.monotonic() < deadline:
    for k, n in sizes.items():
        got = kv.get(k)
        if got is None:
            misses += 1
            continue
        v = int.from_bytes(got[:8], "little")
        expected = bases[k].copy()
        expected[::4096] = v & 0xFF
        expected[:8] = np.frombuffer(v.to_bytes(8, "little"), np.uint8)
        hits += 1
        wrong += got != expected.tobytes()
out = {{"hits": hits, "misses": misses, "wrong": wrong, "corrupt": kv.corrupt_chunks}}
print(json.dumps(out), flush=True)
"""


@pytest.mark.integration
def test_another_process_reads_what_this_one_stores_never_a_mix_of_versions(tmp_path: Path) -> None:
    """The tier is shared: a reader in another process sees whole versions of chunks this
    process keeps overwriting (a read that meets a write in progress is a miss, not data)."""
    cfg = config(tmp_path / "kv")
    sizes = {"small-a": 1 << 20, "small-b": 1 << 20, "large-a": 6 << 20, "large-b": 6 << 20}
    bases = {k: pattern(n, n) for k, n in sizes.items()}
    with KVStore.from_lmcache_config(cfg) as kv:
        for k, b in bases.items():
            b[::4096] = 0  # version 0, stamped like every later one
            b[:8] = 0
            kv.put(k, b)
        reader = subprocess.Popen(
            [sys.executable, "-c", READER.format(cfg=cfg, sizes=sizes)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ),
        )
        assert reader.stdout is not None
        assert reader.stdout.readline().strip() == b"ready"
        v = 0
        while reader.poll() is None:
            v += 1
            for k, b in bases.items():
                b[::4096] = v & 0xFF
                b[:8] = np.frombuffer(v.to_bytes(8, "little"), np.uint8)
                kv.put(k, b)
        with reader.stdout:
            result = json.loads(reader.stdout.read().decode().strip().splitlines()[-1])
    assert reader.wait(10) == 0
    assert result["wrong"] == 0 and result["hits"] > 0 and v > 10
    assert result["misses"] == result["corrupt"]  # every miss was a read that met a write


def test_fsync_always_and_bad_input_is_refused_typed_losing_nothing(tmp_path: Path) -> None:
    with KVStore.from_lmcache_config(config(tmp_path), fsync="always") as kv:
        kv.put("durable", pattern(300_000, 4))
        assert kv.get("durable") == pattern(300_000, 4).tobytes()
        with pytest.raises(InvalidBufferError, match="C-contiguous"):
            kv.put("strided", np.arange(100, dtype=np.uint8)[::2])
        with pytest.raises(InvalidBufferError, match="buffer protocol"):
            kv.put("text", "not bytes")
        with pytest.raises(ValueError, match="longer than 4096"):
            kv.put("k" * 5000, b"x")
        with pytest.raises(InvalidBufferError, match="smaller than the chunk"):
            kv.get("durable", into=np.empty(10, np.uint8))
        with pytest.raises(InvalidBufferError, match="2 keys but 1 buffers"):
            kv.get_many(["durable", "x"], into=[np.empty(10, np.uint8)])
        assert kv.get("durable") == pattern(300_000, 4).tobytes()  # nothing above touched it
        assert not kv.contains("strided") and not kv.contains("text")
    with pytest.raises(ValueError, match="fsync must be"):
        KVStore.from_lmcache_config(config(tmp_path), fsync="sometimes")


def test_batches_through_kept_handles_catch_flips_and_sizes_changed_elsewhere(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The lanes' inline path (kept handle, known size) checks as much as the general one."""
    items = {f"b{i}": pattern(128 << 10, i) for i in range(32)}
    with (
        KVStore.from_lmcache_config(config(tmp_path, pool=64), lanes=2) as kv,
        KVStore.from_lmcache_config(config(tmp_path)) as other,
    ):
        kv.put_many(items)
        kv.put_many(items)  # the second time through kept handles
        intos = [np.zeros(128 << 10, np.uint8) for _ in items]
        assert kv.get_many(list(items), into=intos) == [True] * 32
        assert all(np.array_equal(b, d) for b, d in zip(intos, items.values(), strict=True))
        path = _path(tmp_path, "b5")
        raw = bytearray(path.read_bytes())
        raw[4096 + 1000] ^= 0x10
        path.write_bytes(raw)  # same inode: the kept handle sees it
        other.put("b9", pattern(1000, 99))  # shorter now, written by another store
        other.put("b11", pattern(200 << 10, 11))  # longer now
        with caplog.at_level(logging.WARNING, logger="weft.kvstore"):
            got = kv.get_many(list(items), into=[np.zeros(256 << 10, np.uint8) for _ in items])
        assert got[5] is False and kv.corrupt_chunks == 1
        assert got[9] is True and got[11] is True and got.count(True) == 31
        assert kv.get("b9") == pattern(1000, 99).tobytes()
        assert kv.get("b11") == pattern(200 << 10, 11).tobytes()
