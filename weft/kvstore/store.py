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

Keys: a str, an int or bytes. LMCache names a chunk by an int (``CacheEngineKey.chunk_hash``)
and writes it in lowercase hex (``chunk_hash_hex``, ``to_string``), so an int key is stored
under that hex form (``f"{key:x}"``) and bytes under ``key.hex()``: the int 171, the bytes
``b"\\xab"`` and the str ``"ab"`` name the same chunk. Any other type is an `InvalidKeyError`,
and so is a single str or bytes where a batch call expects a sequence of keys.

Errors are typed and name the key and the file or object: `InvalidKeyError`,
`InvalidBufferError` (a buffer that is not one, read-only, or smaller than the chunk),
`StorageError`, and `StorageFullError` when the disk is full (the chunk the key held before
is intact). A batch call does every key it can: when some fail, it raises `BatchError`
carrying each failed key's error and every other key's result.

A miss never leaves storage bytes in a caller's buffer: ``get(key, into=buf)`` returns False
with `buf` untouched when there is no chunk, and with `buf` zeroed when the chunk failed its
checks (a torn write, a flipped bit, a file extended or cut).

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

from weft.api import errors
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
    def put_many(self, items: Sequence[tuple[str, memoryview]]) -> list[errors.WeftError | None]: ...
    def get_many(self, keys: Sequence[str], intos: Sequence[memoryview | None]) -> list[Any]: ...
    def close(self) -> None: ...


Key = str | int | bytes
"""What a caller may name a chunk by (`key_of` gives the canonical str)."""


def key_of(key: object) -> str:
    """The canonical form of a key: a str as it is, an int in lowercase hex (LMCache's
    ``chunk_hash_hex``), bytes in hex.

    Raises:
        InvalidKeyError: any other type (bool included).
    """
    if isinstance(key, str):
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{key:x}"
    if isinstance(key, (bytes, bytearray)):
        return bytes(key).hex()
    raise errors.InvalidKeyError(
        f"a KV-store key is a str, an int or bytes, got {type(key).__name__} {repr(key)[:80]}"
    )


def _keys(keys: object, call: str) -> list[str]:
    if isinstance(keys, (str, bytes, bytearray, memoryview)):
        raise errors.InvalidKeyError(
            f"{call} takes a sequence of keys, got the single {type(keys).__name__} {repr(keys)[:80]}"
        )
    try:
        listed = list(keys)  # type: ignore[call-overload]
    except TypeError:
        raise errors.InvalidKeyError(f"{call} takes a sequence of keys, got {type(keys).__name__}") from None
    return [key_of(k) for k in listed]


def _pairs(items: object) -> list[tuple[Any, Any]]:
    if isinstance(items, Mapping):
        return list(items.items())
    if isinstance(items, (str, bytes, bytearray, memoryview)):
        raise errors.InvalidKeyError(
            f"put_many takes (key, buffer) pairs, got the single {type(items).__name__}"
        )
    try:
        pairs = [(k, d) for k, d in items]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise errors.InvalidKeyError(
            "put_many takes a mapping or a sequence of (key, buffer) pairs"
        ) from None
    return pairs


def _view(data: Any, what: str, key: str, *, writable: bool = False) -> memoryview:
    try:
        view = memoryview(data)
    except TypeError:
        raise InvalidBufferError(
            f"{what} for chunk {key!r} must support the buffer protocol or __cuda_array_interface__, "
            f"got {type(data).__name__}"
        ) from None
    if not view.c_contiguous:
        raise InvalidBufferError(f"{what} for chunk {key!r} must be C-contiguous")
    if writable and view.readonly:
        raise InvalidBufferError(f"{what} for chunk {key!r} is read-only")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _outcome(call: str, keys: Sequence[str], got: Sequence[Any], failed: Any) -> list[Any]:
    """The results of a batch; `BatchError` when some keys failed (their error in place)."""
    bad = {k: g for k, g in zip(keys, got, strict=True) if isinstance(g, errors.WeftError)}
    results = [failed if isinstance(g, errors.WeftError) else g for g in got]
    if bad:
        first = "; ".join(str(e) for e in list(bad.values())[:3])
        raise errors.BatchError(f"{call}: {len(bad)} of {len(keys)} keys failed: {first}", bad, results)
    return results


def _is_device(data: Any) -> bool:
    return hasattr(data, "__cuda_array_interface__") and not isinstance(data, (bytes, bytearray, memoryview))


def _device_nbytes(data: Any, key: str, *, writable: bool = False) -> int:
    iface = data.__cuda_array_interface__
    if iface.get("strides") is not None:
        raise InvalidBufferError(f"device buffer for chunk {key!r} must be C-contiguous")
    if writable and iface.get("data", (0, False))[1]:
        raise InvalidBufferError(f"device buffer for chunk {key!r} is read-only")
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
        nbytes = _device_nbytes(data, key)
        with self._stage_lock:
            host = self._stage(nbytes)
            gpu.device_to_host(gpu.cuda_pointer(data), host)
            self._tier.put(key, host)

    def _get_device(self, key: str, into: Any) -> bool:
        nbytes = _device_nbytes(into, key, writable=True)
        with self._stage_lock:
            host = self._stage(nbytes)
            got = self._tier.get(key, host)
            if got is None:
                return False
            assert isinstance(got, int)
            gpu.host_to_device(host[:got], gpu.cuda_pointer(into))
            return True

    # -- the API ----------------------------------------------------------------------------
    def put(self, key: Key, data: Any) -> None:
        """Store `data` (host or device buffer) as the chunk `key`, replacing any before.

        Raises:
            InvalidKeyError: a key of another type, or too long.
            InvalidBufferError: `data` is no contiguous buffer.
            StorageFullError: no space; the chunk the key held before is intact.
            StorageError: the tier failed (the key and the file or object are named).
        """
        k = key_of(key)
        if _is_device(data):
            self._put_device(k, data)
        else:
            self._tier.put(k, _view(data, "data", k))

    @overload
    def get(self, key: Key) -> bytes | None: ...
    @overload
    def get(self, key: Key, into: Any) -> bool: ...

    def get(self, key: Key, into: Any = None) -> bytes | bool | None:
        """``get(key)``: the bytes or None; ``get(key, into=buf)``: True and `buf` filled, or
        False (a miss: `buf` untouched when there is no chunk, zeroed when it was corrupt).

        Raises:
            InvalidKeyError: a key of another type, or too long.
            InvalidBufferError: `into` is no writable contiguous buffer, or is smaller than
                the chunk (the chunk is still there).
            StorageError: the tier failed (the key and the file or object are named).
        """
        k = key_of(key)
        if into is None:
            got = self._tier.get(k, None)
            return got if isinstance(got, bytes) else None
        if _is_device(into):
            return self._get_device(k, into)
        return self._tier.get(k, _view(into, "into", k, writable=True)) is not None

    def contains(self, key: Key) -> bool:
        return self._tier.contains(key_of(key))

    def delete(self, key: Key) -> bool:
        """Remove the chunk; True if it was there."""
        return self._tier.delete(key_of(key))

    def put_many(
        self, items: Mapping[str, Any] | Mapping[int, Any] | Mapping[bytes, Any] | Sequence[tuple[Key, Any]]
    ) -> None:
        """Many puts at once (parallel I/O). Device buffers go one by one through the stage.

        Raises:
            InvalidKeyError, InvalidBufferError: a key or a buffer is bad (nothing stored).
            BatchError: some chunks failed (each key's error in ``errors``); the others were
                stored.
        """
        pairs = _pairs(items)
        keys = [key_of(k) for k, _ in pairs]
        got: list[errors.WeftError | None] = [None] * len(pairs)
        host = [i for i, (_, d) in enumerate(pairs) if not _is_device(d)]
        views = [(keys[i], _view(pairs[i][1], "data", keys[i])) for i in host]
        for i, (_, d) in enumerate(pairs):
            if _is_device(d):
                try:
                    self._put_device(keys[i], d)
                except errors.WeftError as exc:
                    got[i] = exc
        for i, g in zip(host, self._tier.put_many(views), strict=True):
            got[i] = g
        _outcome("put_many", keys, got, False)

    def get_many(self, keys: Sequence[Key], into: Sequence[Any] | None = None) -> list[Any]:
        """Many gets at once (parallel I/O): bytes/None per key, or bool per key with `into`.

        Raises:
            InvalidKeyError: `keys` is a single str or bytes, or holds a bad key.
            InvalidBufferError: `into` does not match `keys`, or holds no writable buffer.
            BatchError: some keys failed (each one's error in ``errors``); ``results`` holds
                every other key's answer.
        """
        names = _keys(keys, "get_many")
        if into is None:
            got = self._tier.get_many(names, [None] * len(names))
            return _outcome(
                "get_many",
                names,
                [g if isinstance(g, (bytes, errors.WeftError)) else None for g in got],
                None,
            )
        if isinstance(into, (str, bytes, bytearray, memoryview)) or not isinstance(into, Sequence):
            raise InvalidBufferError(
                f"get_many takes a sequence of buffers as into, got {type(into).__name__}"
            )
        if len(into) != len(names):
            raise InvalidBufferError(f"{len(names)} keys but {len(into)} buffers")
        device = {i for i, b in enumerate(into) if _is_device(b)}
        host_idx = [i for i in range(len(names)) if i not in device]
        views = [_view(into[i], "into", names[i], writable=True) for i in host_idx]
        results: list[Any] = [False] * len(names)
        got = self._tier.get_many([names[i] for i in host_idx], views)
        for i, g in zip(host_idx, got, strict=True):
            results[i] = g if isinstance(g, errors.WeftError) else g is not None
        for i in sorted(device):
            try:
                results[i] = self._get_device(names[i], into[i])
            except errors.WeftError as exc:
                results[i] = exc
        return _outcome("get_many", names, results, False)

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
