"""What every KV-store tier must do, checked the same way for each (POSIX, OBJ)."""

from __future__ import annotations

import numpy as np

from weft.kvstore import KVStore


def pattern(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def check_round_trip(kv: KVStore, size: int) -> None:
    """put, contains, get as bytes and into a larger buffer, misses, delete (twice)."""
    key = f"chunk-{size}"
    data = pattern(size, size)
    kv.put(key, data)
    assert kv.contains(key)
    assert kv.get(key) == data.tobytes()
    into = np.zeros(size + 10, np.uint8)
    assert kv.get(key, into=into) is True
    assert np.array_equal(into[:size], data)
    assert kv.get("absent") is None and kv.get("absent", into=into) is False
    assert kv.delete(key) and not kv.contains(key)
    assert kv.delete(key) is False
