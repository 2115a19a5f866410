"""The OBJ tier: one S3 object per KV chunk, in the chunk format of every tier (`chunk`).

An object is named by the SHA-256 of its key (``<prefix>/<sha256>.kv``; the key is stored
inside and compared). S3 makes a PUT atomic (multipart too: the object appears when the
upload completes), so a writer killed mid-put leaves nothing; the digests still guard every
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

from weft.fabric.objstore import S3Client
from weft.kvstore import _hash, chunk
from weft.kvstore.chunk import DIGEST, SEGMENT, Corrupt

log = logging.getLogger(__name__)
T = TypeVar("T")


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
        kb = chunk.key_bytes(key)
        dlen = data.nbytes
        head = chunk.head(kb, dlen)
        off, nseg = len(head), chunk.segments(dlen)
        body = bytearray(chunk.total_size(len(kb), dlen))
        body[:off] = head
        body[off : off + dlen] = data  # one copy: S3 wants the object as one body
        seg = b"".join(_hash.digest(data[i * SEGMENT : (i + 1) * SEGMENT]) for i in range(nseg))
        body[off + dlen : off + dlen + len(seg)] = seg
        body[off + dlen + len(seg) :] = chunk.final_digest(head, len(kb), seg)
        self.client.put(object_name(key), body)

    def get(self, key: str, into: memoryview | None) -> bytes | int | None:
        """Read a chunk: into `into` (returns its length) or as bytes; None on a miss."""
        kb = chunk.key_bytes(key)
        name = object_name(key)
        off = chunk.data_offset(len(kb))
        try:
            if into is not None and into.nbytes > 2 * self.client.part_size:
                parts = self._get_ranges(name, len(kb), into.nbytes)
                if parts is None:
                    return None
                head, pieces, foot = parts
            else:
                body = self.client.get(name)
                if body is None:
                    return None
                view = memoryview(body)
                dlen = chunk.data_len(view.nbytes, len(kb))
                if dlen is None:
                    raise Corrupt("no chunk has this object's length")
                head, pieces, foot = view[:off], [view[off : off + dlen]], view[off + dlen :]
            dlen = sum(p.nbytes for p in pieces)
            chunk.check_head(head, kb, dlen)
            if into is None:
                target = memoryview(bytearray(dlen))
            elif into.nbytes < dlen:
                raise ValueError(f"buffer of {into.nbytes} bytes is smaller than the chunk ({dlen})")
            else:
                target = into[:dlen]
            at = 0
            for p in pieces:
                target[at : at + p.nbytes] = p
                at += p.nbytes
            for i in range(chunk.segments(dlen)):
                if (
                    _hash.digest(target[i * SEGMENT : (i + 1) * SEGMENT])
                    != foot[DIGEST * i : DIGEST * (i + 1)]
                ):
                    raise Corrupt(f"checksum mismatch in segment {i}")
            chunk.check_digests(head, kb, foot)
            return dlen if into is not None else bytes(target)
        except Corrupt as exc:
            with self._count_lock:  # pool threads may find two at once
                self.corrupt += 1
            log.warning("kvstore: object %s for chunk %r is corrupt (%s): a miss", name, key, exc)
            return None

    def _get_ranges(self, name: str, klen: int, hint: int) -> tuple[Any, list[memoryview], Any] | None:
        """A large chunk as parallel ranges of `part_size`: head, data pieces, digests."""
        size = self.client.size(name)
        if size is None:
            return None
        dlen = chunk.data_len(size, klen)
        if dlen is None:
            raise Corrupt("no chunk has this object's length")
        off, part = chunk.data_offset(klen), self.client.part_size
        starts = [0] + [off + p for p in range(0, dlen, part)] + [off + dlen]
        lengths = [off] + [min(part, dlen - p) for p in range(0, dlen, part)] + [size - off - dlen]
        got = self.client.get_ranges(name, starts, lengths)
        if got is None:
            return None
        views = [memoryview(g) for g in got]
        if [v.nbytes for v in views] != lengths:
            raise Corrupt("ranges came back short (the object changed while it was read?)")
        return views[0], views[1:-1], views[-1]

    def contains(self, key: str) -> bool:
        return self.client.size(object_name(key)) is not None

    def delete(self, key: str) -> bool:
        name = object_name(key)
        existed = self.client.size(name) is not None
        self.client.delete(name)
        return existed

    def _all(self, calls: Sequence[Callable[[], T]]) -> list[T]:
        """Run every call on the pool; wait for all of them before raising the first error
        (no request may still fill a caller's buffer after we return)."""
        futures = [self._pool.submit(c) for c in calls]
        errors = [f.exception() for f in futures]
        for e in errors:
            if e is not None:
                raise e
        return [f.result() for f in futures]

    def put_many(self, items: Sequence[tuple[str, memoryview]]) -> None:
        self._all([lambda k=k, d=d: self.put(k, d) for k, d in items])  # type: ignore[misc]

    def get_many(self, keys: Sequence[str], intos: Sequence[memoryview | None]) -> list[Any]:
        if len(keys) != len(intos):
            raise ValueError(f"{len(keys)} keys but {len(intos)} buffers")
        return self._all([lambda k=k, b=b: self.get(k, b) for k, b in zip(keys, intos, strict=True)])  # type: ignore[misc]
