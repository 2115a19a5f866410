"""`KVStore`: LMCache-style put/get of KV chunks by key, on the tier the config names.

Mapping from tokens to bytes: a key is one LMCache chunk (its hash), holding the KV cache of
``chunk_size`` tokens for all layers, whatever the model's bytes per token are (for
Llama-3.1-8B in bf16, 256 tokens x 32 layers x 2 (K, V) x 8 heads x 128 x 2 bytes = 32 MiB).
The store keeps each chunk whole under its key and never splits one across keys: LMCache
already cut the sequence into chunks, and its keys (prefix hashes) are what later requests
look up. Inside a tier a chunk is hashed and moved in 4 MiB segments (`weft.kvstore.chunk`),
which is what parallelism and checksums need, not a second chunking the caller sees.

Staging: host buffers (numpy, bytearray, mmap, pinned memory) are read and written in place,
with no copy, as NIXL does with registered DRAM. Device buffers (``__cuda_array_interface__``)
on the host tiers (POSIX, OBJ) pass through the staging buffer: ``nixl_buffer_size`` bytes on
``nixl_buffer_device``, allocated once, at the first device buffer (most callers pass host
memory, and 1 GiB per store is not free); a chunk larger than it is refused.

``nixl_pool_size``: on POSIX, how many chunk files stay open after their first use (least
recently used closed first; the 256 shard directories are opened at init); on OBJ, how many
requests are in flight at once (one client and its connection pool, made at init).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, overload

import numpy as np

from weft.fabric import gpu
from weft.fabric.errors import ConfigError, InvalidBufferError
from weft.kvstore.config import LMCacheConfig, NixlBackend, load_lmcache_config
from weft.kvstore.posix import FsyncPolicy, PosixTier


class Tier(Protocol):
    corrupt: int

    def put(self, key: str, data: memoryview) -> None: ...
    def get(self, key: str, into: memoryview | None) -> bytes | int | None: ...
    def contains(self, key: str) -> bool: ...
    def delete(self, key: str) -> bool: ...
    def put_many(self, items: Sequence[tuple[str, memoryview]]) -> None: ...
    def get_many(self, keys: Sequence[str], intos: Sequence[memoryview | None]) -> list[Any]: ...
    def close(self) -> None: ...


def _view(data: Any, what: str) -> memoryview:
    try:
        view = memoryview(data)
    except TypeError:
        raise InvalidBufferError(
            f"{what} must support the buffer protocol or __cuda_array_interface__, got {type(data).__name__}"
        ) from None
    if not view.c_contiguous:
        raise InvalidBufferError(f"{what} must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _is_device(data: Any) -> bool:
    return hasattr(data, "__cuda_array_interface__") and not isinstance(data, (bytes, bytearray, memoryview))


def _device_nbytes(data: Any) -> int:
    iface = data.__cuda_array_interface__
    if iface.get("strides") is not None:
        raise InvalidBufferError("device buffers must be C-contiguous")
    return int(np.prod(iface["shape"], dtype=np.int64)) * int(np.dtype(iface["typestr"]).itemsize)


class KVStore:
    """KV-cache chunks by key on the configured tier.

    Args:
        config: a checked `LMCacheConfig`.
        fsync: POSIX durability (``never``: page cache; a process crash never tears a chunk).
        lanes: POSIX threads sharing a batch or a large chunk (default: the CPU count).
        direct: POSIX ``O_DIRECT`` for aligned buffers.
        handles: POSIX chunk files kept open (default: ``nixl_pool_size``); a working set of
            chunks larger than this pays an open and a close per access.
        timeout_s: OBJ deadline per request.
    """

    def __init__(
        self,
        config: LMCacheConfig,
        *,
        fsync: FsyncPolicy = "never",
        lanes: int | None = None,
        direct: bool = False,
        handles: int | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.config = config
        backend = config.backend
        pool = config.extra_config.nixl_pool_size
        self._tier: Tier
        if backend is NixlBackend.POSIX:
            assert config.extra_config.nixl_path is not None
            self._tier = PosixTier(
                Path(config.extra_config.nixl_path), pool, fsync, lanes=lanes, direct=direct
            )
        elif backend is NixlBackend.OBJ:
            from weft.fabric.objstore import S3Client
            from weft.kvstore.obj import ObjTier

            client = S3Client.from_params(config.obj_params, timeout_s=timeout_s)
            client.check_bucket()
            self._tier = ObjTier(client, pool)
        else:
            # GDS and GDS_MT need kvikio and a GPU; neither was here to build and test on
            raise ConfigError(f"the {backend.value} tier is not in this weft yet (POSIX and OBJ are)")
        self._stage_lock = threading.Lock()
        self._staging: Any = None

    @classmethod
    def from_lmcache_config(
        cls, source: str | os.PathLike[str] | Mapping[str, Any] | None = None, **kw: Any
    ) -> KVStore:
        """From an ``lmcache-config.yaml`` path, a mapping, or ``$LMCACHE_CONFIG_FILE``."""
        return cls(load_lmcache_config(source), **kw)

    # -- staging for device buffers ---------------------------------------------------------
    def _stage(self, nbytes: int) -> memoryview:
        if nbytes > self.config.nixl_buffer_size:
            raise InvalidBufferError(
                f"a device chunk of {nbytes} bytes does not fit the staging buffer "
                f"(nixl_buffer_size={self.config.nixl_buffer_size})"
            )
        if self._staging is None:
            gpu.require_gpu("a device buffer in the KV store")
            self._staging = np.empty(self.config.nixl_buffer_size, np.uint8)
        return memoryview(self._staging)[:nbytes]

    def _put_device(self, key: str, data: Any) -> None:
        nbytes = _device_nbytes(data)
        with self._stage_lock:
            host = self._stage(nbytes)
            gpu.device_to_host(gpu.cuda_pointer(data), host)
            self._tier.put(key, host)

    def _get_device(self, key: str, into: Any) -> bool:
        nbytes = _device_nbytes(into)
        with self._stage_lock:
            host = self._stage(nbytes)
            got = self._tier.get(key, host)
            if got is None:
                return False
            assert isinstance(got, int)
            gpu.host_to_device(host[:got], gpu.cuda_pointer(into))
            return True

    # -- the API ----------------------------------------------------------------------------
    def put(self, key: str, data: Any) -> None:
        """Store `data` (host or device buffer) as the chunk `key`, replacing any before."""
        if _is_device(data):
            self._put_device(key, data)
        else:
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
        if _is_device(into):
            return self._get_device(key, into)
        return self._tier.get(key, _view(into, "into")) is not None

    def contains(self, key: str) -> bool:
        return self._tier.contains(key)

    def delete(self, key: str) -> bool:
        """Remove the chunk; True if it was there."""
        return self._tier.delete(key)

    def put_many(self, items: Mapping[str, Any] | Sequence[tuple[str, Any]]) -> None:
        """Many puts at once (parallel I/O). Device buffers go one by one through the stage."""
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        host = [(k, _view(d, "data")) for k, d in pairs if not _is_device(d)]
        for k, d in pairs:
            if _is_device(d):
                self._put_device(k, d)
        self._tier.put_many(host)

    def get_many(self, keys: Sequence[str], into: Sequence[Any] | None = None) -> list[Any]:
        """Many gets at once (parallel I/O): bytes/None per key, or bool per key with `into`."""
        if into is None:
            got = self._tier.get_many(keys, [None] * len(keys))
            return [g if isinstance(g, bytes) else None for g in got]
        if len(into) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(into)} buffers")
        device = {i for i, b in enumerate(into) if _is_device(b)}
        host_idx = [i for i in range(len(keys)) if i not in device]
        results: list[Any] = [False] * len(keys)
        got = self._tier.get_many([keys[i] for i in host_idx], [_view(into[i], "into") for i in host_idx])
        for i, g in zip(host_idx, got, strict=True):
            results[i] = g is not None
        for i in sorted(device):
            results[i] = self._get_device(keys[i], into[i])
        return results

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
