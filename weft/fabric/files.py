"""The POSIX file engine of the fabric: lanes, kept handles, O_DIRECT, whole reads and writes.

One engine serves both users of files: the fabric's `posix` backend (FILE memory: raw bytes
at the caller's offsets) and `weft.kvstore`'s POSIX tier (keyed, checksummed chunks). It was
measured faster than NIXL's POSIX backend on the KV store's chunks (`bench/kvstore.py`), for
three reasons kept here:

- Page-cache copies are bound by CPU, so large requests are split over `Lanes` (threads; one
  part runs in the caller's thread, no hand-off for the first part).
- Opening a file costs more than reading a small one: `Handles` keeps up to N open, least
  recently used closed first, never under a user.
- ``O_DIRECT`` where the buffer, the offset and the length are 4096-aligned (`pick`), the page
  cache for the rest.

System calls may move fewer bytes than asked (signals, quotas): `write_all` and `preadv_all`
finish the job or say how far they got.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

#: O_DIRECT's alignment (buffer address, file offset and length).
ALIGN = 4096


class Handles:
    """Open chunk files, kept for reuse: at most `size`, least recently used closed first.

    A handle in use is never closed under its user: eviction and `drop` only mark it, and
    the last `release` closes it. A handle may outlive a delete by another process; it then
    reads the chunk as it was, which is still that key's data (LMCache keys are content
    hashes).
    """

    def __init__(self, size: int) -> None:
        self.size = max(0, size)
        self._lock = threading.Lock()
        self._open: OrderedDict[str, list[int]] = OrderedDict()  # key -> [fd, users, size]
        self._doomed: dict[int, int] = {}  # fd -> users, evicted while in use

    def acquire(self, key: str, opener: Callable[[], int]) -> int:
        with self._lock:
            entry = self._open.get(key)
            if entry is not None:
                self._open.move_to_end(key)
                entry[1] += 1
                return entry[0]
        fd = opener()  # outside the lock: opening may block on the filesystem
        if self.size == 0:
            return fd
        with self._lock:
            entry = self._open.get(key)
            if entry is not None:  # another thread opened it meanwhile: use theirs
                entry[1] += 1
                os.close(fd)
                return entry[0]
            self._open[key] = [fd, 1, -1]
            while len(self._open) > self.size:
                _, (old, users, _) = self._open.popitem(last=False)
                self._retire(old, users)
            return fd

    def release(self, key: str, fd: int) -> None:
        if self.size == 0:
            os.close(fd)
            return
        with self._lock:
            entry = self._open.get(key)
            if entry is not None and entry[0] == fd:
                entry[1] -= 1
                return
            users = self._doomed[fd] - 1
            if users:
                self._doomed[fd] = users
                return
            del self._doomed[fd]
        os.close(fd)

    def size_of(self, key: str) -> int:
        """The file size last seen through this key's kept handle (-1: none). A hint: the
        reader checks it against the header and the digests, and asks fstat when it fails."""
        entry = self._open.get(key)
        return entry[2] if entry is not None else -1

    def remember(self, key: str, size: int) -> None:
        entry = self._open.get(key)
        if entry is not None:
            entry[2] = size

    def drop(self, key: str) -> None:
        with self._lock:
            entry = self._open.pop(key, None)
            if entry is not None:
                self._retire(entry[0], entry[1])

    def _retire(self, fd: int, users: int) -> None:
        if users:
            self._doomed[fd] = users
        else:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            for fd, users, _ in self._open.values():
                self._retire(fd, users)
            self._open.clear()


class Lanes:
    """Threads that share one request: `spread(count, fn, lanes)` runs fn(lo, hi) on up to
    `lanes` contiguous ranges of 0..count-1, the first in the calling thread.

    Args:
        lanes: most parallel parts (default: the CPU count).
        name: thread-name prefix.
    """

    def __init__(self, lanes: int | None, name: str) -> None:
        self.lanes = max(1, lanes if lanes is not None else os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=self.lanes, thread_name_prefix=name)

    def spread(self, count: int, fn: Callable[[int, int], None], lanes: int | None = None) -> None:
        parts = min(count, self.lanes if lanes is None else lanes)
        if parts <= 1:
            fn(0, count)
            return
        bounds = [count * j // parts for j in range(parts + 1)]
        futures = [self._pool.submit(fn, bounds[j], bounds[j + 1]) for j in range(1, parts)]
        try:
            fn(bounds[0], bounds[1])
        finally:
            for f in futures:
                f.result()

    def submit(self, fn: Callable[[], None]) -> None:
        """Run `fn` on a lane thread (it must handle its own errors)."""
        self._pool.submit(fn)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def pick(fd: int, dfd: int | None, piece: memoryview, offset: int) -> int:
    """The O_DIRECT handle when it may carry this piece, else the buffered one."""
    if dfd is None or offset % ALIGN or piece.nbytes % ALIGN:
        return fd
    return dfd if np.frombuffer(piece, dtype=np.uint8).ctypes.data % ALIGN == 0 else fd


def write_all(fd: int, parts: list[Any], offset: int) -> None:
    views = [memoryview(p).cast("B") for p in parts]
    views = [v for v in views if v.nbytes]
    while views:
        n = os.pwritev(fd, views, offset)
        offset += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def preadv_all(fd: int, parts: list[Any], offset: int) -> int:
    """Fill `parts` in order from `offset` until they are full or the file ends; bytes read."""
    views = [memoryview(p).cast("B") for p in parts]
    views = [v for v in views if v.nbytes]
    done = 0
    while views:
        n = os.preadv(fd, views, offset + done)
        if n == 0:
            break
        done += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return done
