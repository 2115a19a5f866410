"""`KVStore`: LMCache-style put/get of KV chunks by key, on the tier the config names.

Mapping from tokens to bytes: a key is one LMCache chunk (its hash), holding the KV cache of
``chunk_size`` tokens for all layers, whatever the model's bytes per token are; the store keeps
each chunk whole under its key and never splits one chunk across keys (LMCache already cut the
sequence into chunks). Chunks larger than the staging buffer still go in one piece on the
POSIX tier, which reads and writes straight from the caller's host buffer.

In progress (issue 5): the POSIX tier is here; OBJ (S3) and GDS come next and are refused
by name until then.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, overload

from weft.fabric.errors import ConfigError, InvalidBufferError
from weft.kvstore.config import LMCacheConfig, NixlBackend, load_lmcache_config
from weft.kvstore.posix import FsyncPolicy, PosixTier


def _view(data: Any, what: str) -> memoryview:
    try:
        view = memoryview(data)
    except TypeError:
        raise InvalidBufferError(
            f"{what} must support the buffer protocol, got {type(data).__name__}"
        ) from None
    if not view.c_contiguous:
        raise InvalidBufferError(f"{what} must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class KVStore:
    """KV-cache chunks by key on the configured tier.

    Args:
        config: a checked `LMCacheConfig`.
        fsync: POSIX durability (``never``: page cache, a process crash never tears a chunk).
    """

    def __init__(self, config: LMCacheConfig, *, fsync: FsyncPolicy = "never") -> None:
        self.config = config
        backend = config.backend
        if backend is not NixlBackend.POSIX:
            raise ConfigError(f"the {backend.value} tier is not in this weft yet (POSIX is)")
        assert config.extra_config.nixl_path is not None
        self._tier = PosixTier(Path(config.extra_config.nixl_path), config.extra_config.nixl_pool_size, fsync)

    @classmethod
    def from_lmcache_config(
        cls, source: str | os.PathLike[str] | Mapping[str, Any] | None = None, **kw: Any
    ) -> KVStore:
        """From an ``lmcache-config.yaml`` path, a mapping, or ``$LMCACHE_CONFIG_FILE``."""
        return cls(load_lmcache_config(source), **kw)

    def put(self, key: str, data: Any) -> None:
        self._tier.put(key, _view(data, "data"))

    @overload
    def get(self, key: str) -> bytes | None: ...
    @overload
    def get(self, key: str, into: Any) -> bool: ...

    def get(self, key: str, into: Any = None) -> bytes | bool | None:
        """``get(key)``: the bytes or None; ``get(key, into=buf)``: True and `buf` filled, or False."""
        if into is None:
            got = self._tier.get(key, None)
            return got if isinstance(got, bytes) else None
        return self._tier.get(key, _view(into, "into")) is not None

    def contains(self, key: str) -> bool:
        return self._tier.contains(key)

    def delete(self, key: str) -> bool:
        return self._tier.delete(key)

    def put_many(self, items: Mapping[str, Any] | Sequence[tuple[str, Any]]) -> None:
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        self._tier.put_many([(k, _view(d, "data")) for k, d in pairs])

    def get_many(self, keys: Sequence[str], into: Sequence[Any] | None = None) -> list[Any]:
        """Many gets at once (parallel I/O): bytes/None per key, or bool per key with `into`."""
        if into is None:
            got = self._tier.get_many(keys, [None] * len(keys))
            return [g if isinstance(g, bytes) else None for g in got]
        results = self._tier.get_many(keys, [_view(b, "into") for b in into])
        return [r is not None for r in results]

    @property
    def corrupt_chunks(self) -> int:
        """Chunks found torn or flipped (read as misses) since the store opened."""
        return self._tier.corrupt

    def close(self) -> None:
        self._tier.close()

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
