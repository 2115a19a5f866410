"""The POSIX tier: round trips, batches, a killed writer, a flipped byte."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

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


def pattern(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 65537, 1 << 20, (8 << 20) + 3])
def test_round_trips_of_many_sizes(tmp_path: Path, size: int) -> None:
    with KVStore.from_lmcache_config(config(tmp_path)) as kv:
        data = pattern(size, size)
        kv.put(f"chunk-{size}", data)
        assert kv.contains(f"chunk-{size}")
        assert kv.get(f"chunk-{size}") == data.tobytes()
        into = np.zeros(size + 10, np.uint8)
        assert kv.get(f"chunk-{size}", into=into) is True
        assert np.array_equal(into[:size], data)
        assert kv.get("absent") is None and kv.get("absent", into=into) is False
        assert kv.delete(f"chunk-{size}") and not kv.contains(f"chunk-{size}")


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
        with pytest.raises(ValueError, match="smaller than the chunk"):
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
for i in range(10**6):
    kv.put(f"w{{i % 8}}", np.random.default_rng(i % 8).integers(0, 256, 16 << 20, dtype=np.uint8))
    print(i, flush=True)
"""


@pytest.mark.integration
def test_a_writer_killed_mid_write_never_leaves_a_torn_chunk(tmp_path: Path) -> None:
    cfg = config(tmp_path / "kv")
    code = WRITER.format(cfg=cfg)
    torn = 0
    for delay in (0.3, 0.55, 0.8, 1.1):
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
                assert got is None or got == pattern(16 << 20, i).tobytes()
            torn += kv.corrupt_chunks  # a chunk cut mid-write: caught by its checksum
    assert torn >= 1  # the kills did land inside writes, and what they left never read as data
