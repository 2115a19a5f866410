"""The OBJ tier: one S3 object per KV chunk, in the chunk format of every tier (`chunk`).

An object is named by the SHA-256 of its key (``<prefix>/<sha256>.kv``; the key is stored
inside and compared). A chunk goes up as one PUT, never multipart: S3 makes a PUT atomic, so a writer
killed or failing mid-put leaves nothing behind, neither a torn object nor an incomplete
multipart upload (obstore has no call to abort or list one); the digests still guard every
read against bytes flipped at rest or in flight, and a chunk that fails them is a miss with
a warning.

Reads of a chunk larger than two parts are fetched as parallel byte ranges when the caller's
buffer says it will be that large; other reads are one GET. Batches run on a pool of
``nixl_pool_size`` threads (requests wait on the network, not on the CPU, and obstore
releases the GIL for the whole request).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from weft.api import errors
from weft.fabric.errors import InvalidBufferError
from weft.fabric.objstore import S3Client
from weft.kvstore import chunk
from weft.kvstore.chunk import Corrupt

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_PUT_BYTES = 5 << 30  # S3's limit for one PUT


def object_name(key: str) -> str:
    return f"{chunk.key_hash(key)}.kv"


class ObjTier:
    """Chunks as objects in one bucket.

    Args:
        client: the bucket (`weft.fabric.objstore.S3Client`).
        workers: requests in flight at once for batches (``nixl_pool_size``).
    """

    def __init__(self, client: S3Client, workers: int = 64) -> None:
        self.client = client
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="weft-kv-obj")
        self.corrupt = 0
        self._count_lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def put(self, key: str, data: memoryview) -> None:
        """Store the chunk as one PUT (never multipart: nothing is left behind to abort).

        Raises:
            InvalidBufferError: the chunk is larger than one PUT may carry (5 GiB).
            StorageError: the request failed (the key and the object are named).
        """
        if data.nbytes > MAX_PUT_BYTES:
            raise InvalidBufferError(
                f"chunk {key!r} of {data.nbytes} bytes is larger than one S3 PUT ({MAX_PUT_BYTES})"
            )
        self.client.put(object_name(key), chunk.encode(key, data), multipart=False, key=key)

    def get(self, key: str, into: memoryview | None) -> bytes | int | None:
        """Read a chunk: into `into` (returns its length) or as bytes; None on a miss.

        On a miss `into` holds no byte of the object: untouched when there is none, zeroed
        when it failed a check.

        Raises:
            InvalidBufferError: `into` is smaller than the chunk (the key is named).
            StorageError: the request failed.
        """
        kb = chunk.key_bytes(key)
        name = object_name(key)
        try:
            if into is not None and into.nbytes > 2 * self.client.part_size:
                return self._get_large(key, kb, name, into)
            body = self.client.get(name, key=key)
            if body is None:
                return None
            data = chunk.decode(body, key)
            if into is None:
                return bytes(data)
            _fits(key, name, into, data.nbytes)
            into[: data.nbytes] = data
            return data.nbytes
        except Corrupt as exc:
            if into is not None:
                into[:] = bytes(into.nbytes)  # no unchecked byte stays in the caller's buffer
            with self._count_lock:  # pool threads may find two at once
                self.corrupt += 1
            log.warning("kvstore: object %s for chunk %r is corrupt (%s): a miss", name, key, exc)
            return None

    def _get_large(self, key: str, kb: bytes, name: str, into: memoryview) -> int | None:
        parts = self._get_ranges(name, len(kb), into.nbytes, key)
        if parts is None:
            return None
        head, pieces, foot = parts
        dlen = sum(p.nbytes for p in pieces)
        chunk.check_head(head, kb, dlen)
        _fits(key, name, into, dlen)
        target = into[:dlen]
        at = 0
        for p in pieces:
            target[at : at + p.nbytes] = p
            at += p.nbytes
        chunk.check_segments(target, foot)
        chunk.check_digests(head, kb, foot)
        return dlen

    def _get_ranges(
        self, name: str, klen: int, hint: int, key: str
    ) -> tuple[Any, list[memoryview], Any] | None:
        """A large chunk as parallel ranges of `part_size`: head, data pieces, digests."""
        size = self.client.size(name, key=key)
        if size is None:
            return None
        dlen = chunk.data_len(size, klen)
        if dlen is None:
            raise Corrupt("no chunk has this object's length")
        off, part = chunk.data_offset(klen), self.client.part_size
        starts = [0] + [off + p for p in range(0, dlen, part)] + [off + dlen]
        lengths = [off] + [min(part, dlen - p) for p in range(0, dlen, part)] + [size - off - dlen]
        got = self.client.get_ranges(name, starts, lengths, key=key)
        if got is None:
            return None
        views = [memoryview(g) for g in got]
        if [v.nbytes for v in views] != lengths:
            raise Corrupt("ranges came back short (the object changed while it was read?)")
        return views[0], views[1:-1], views[-1]

    def contains(self, key: str) -> bool:
        return self.client.size(object_name(key), key=key) is not None

    def delete(self, key: str) -> bool:
        name = object_name(key)
        existed = self.client.size(name, key=key) is not None
        self.client.delete(name, key=key)
        return existed

    def _each(self, calls: Sequence[Callable[[], T]]) -> list[T | errors.WeftError]:
        """Run every call on the pool and wait for all of them (no request may still fill a
        caller's buffer after we return); a call that failed typed gives its error in its
        place, so one bad chunk fails only its own key."""
        futures = [self._pool.submit(c) for c in calls]
        out: list[T | errors.WeftError] = []
        for f in futures:
            exc = f.exception()
            if exc is None:
                out.append(f.result())
            elif isinstance(exc, errors.WeftError):
                out.append(exc)
            else:
                raise exc
        return out

    def put_many(self, items: Sequence[tuple[str, memoryview]]) -> list[errors.WeftError | None]:
        done = self._each([lambda k=k, d=d: self.put(k, d) for k, d in items])  # type: ignore[misc]
        return [d if isinstance(d, errors.WeftError) else None for d in done]

    def get_many(self, keys: Sequence[str], intos: Sequence[memoryview | None]) -> list[Any]:
        """Per key: bytes, a length, None (a miss), or the key's typed error."""
        return self._each([lambda k=k, b=b: self.get(k, b) for k, b in zip(keys, intos, strict=True)])  # type: ignore[misc]


def _fits(key: str, name: str, into: memoryview, dlen: int) -> None:
    if into.nbytes < dlen:
        raise InvalidBufferError(
            f"buffer of {into.nbytes} bytes for chunk {key!r} ({name}) is smaller than the chunk ({dlen})"
        )
