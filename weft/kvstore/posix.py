"""The POSIX tier: one file per KV chunk under ``nixl_path``, checksummed, never read torn.

A file holds one chunk in the format of every tier (`weft.kvstore.chunk`: header, key, pad to
4096, data, 4 MiB segment digests, final digest).

A writer overwrites the file in place: header, data, then the digests last. It shortens the
file if the old chunk was longer and, with ``fsync="always"``, syncs it. A writer killed at
any point, a torn page or a flipped bit leaves a chunk that fails its digests or its length
check. Such a chunk reads as a miss with a warning, never as data, and stays until it is
overwritten (a writer may be filling it right now). Writing in place keeps the page cache's
pages: truncating or renaming first cost 3-6x per chunk here (`bench/kvstore.py`).

A full disk cannot cost the old copy: before a write makes a file longer, its new length is
reserved (``posix_fallocate``). When that fails (``ENOSPC``) nothing was written, the file
keeps its old length and bytes, and the put raises `StorageFullError` (a new chunk's empty
file is removed). An overwrite no longer than the old chunk needs no new space. Every other
failure of the filesystem is a `StorageError` naming the key and the file; in a batch it
fails that key alone.

Files are spread over 256 sub-directories by the first byte of the key's SHA-256 (the key is
stored inside and compared). The 256 directories are opened once, at init, and every file is
opened relative to its directory's handle; up to ``nixl_pool_size`` chunk files stay open for
reuse (`weft.fabric.files.Handles`).

Parallelism: page-cache copies are bound by CPU, so a batch or a large chunk is split into
at most ``lanes`` parts (default: the CPU count), one of them in the calling thread.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from weft.api import errors
from weft.fabric import files
from weft.fabric.errors import InvalidBufferError
from weft.kvstore import _hash, chunk
from weft.kvstore.chunk import ALIGN, DIGEST, SEGMENT, Corrupt

log = logging.getLogger(__name__)

PIECE = 512 << 10  # bytes moved per system call inside a segment (hashed while in cache)
SHARDS = 256

FsyncPolicy = Literal["always", "never"]


def _name(key: str) -> tuple[int, str]:
    h = chunk.key_hash(key)
    return int(h[:2], 16), f"{h}.kv"


def _path(root: Path, key: str) -> Path:
    """Where `key`'s chunk lives (tests and tools)."""
    shard, name = _name(key)
    return Path(root) / f"{shard:02x}" / name


def _failed(root: Path, key: str, op: str, exc: OSError) -> errors.StorageError:
    """The typed error of a failed system call on `key`'s chunk file."""
    path = str(_path(root, key))
    why = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return errors.StorageFullError(
            f"no space left to {op} chunk {key!r} at {path} ({why}): not stored",
            key=key,
            path=path,
        )
    return errors.StorageError(f"cannot {op} chunk {key!r} at {path}: {why}", key=key, path=path)


def _zero(into: memoryview | None) -> None:
    """A read that failed its checks leaves no byte of it in the caller's buffer."""
    if into is not None and into.nbytes:
        np.frombuffer(into, dtype=np.uint8).fill(0)


class PosixTier:
    """Chunks as files under `root`.

    Args:
        root: ``nixl_path``; created if missing.
        handles: chunk files kept open for reuse (``nixl_pool_size``; 0: none).
        fsync: ``always`` (durable before `put` returns) or ``never`` (page cache; a crash of
            the host, not of the process, may lose recent chunks, never tear one).
        lanes: how many threads share a batch or a large chunk (default: the CPU count;
            page-cache copies are bound by CPU).
        direct: move data with ``O_DIRECT`` where the buffer, offset and length are
            4096-aligned (the rest goes through the page cache); refused by filesystems that
            lack it (tmpfs), with a warning, once.
    """

    def __init__(
        self,
        root: Path,
        handles: int = 64,
        fsync: FsyncPolicy = "never",
        *,
        lanes: int | None = None,
        direct: bool = False,
    ) -> None:
        if fsync not in ("always", "never"):
            raise ValueError(f"fsync must be 'always' or 'never', got {fsync!r}")
        self.root = Path(root)
        self.fsync = fsync
        self.direct = direct
        self._lanes = files.Lanes(lanes, "weft-kv-posix")
        self.lanes = self._lanes.lanes
        self._handles = files.Handles(handles)
        self._dirs: list[int] = []
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for shard in range(SHARDS):
                d = self.root / f"{shard:02x}"
                d.mkdir(exist_ok=True)
                self._dirs.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY))
        except OSError as exc:
            self.close()
            raise errors.StorageError(
                f"nixl_path {str(self.root)!r} cannot hold the KV store: "
                f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}",
                path=str(self.root),
            ) from None
        except BaseException:
            self.close()
            raise
        self.corrupt = 0

    def close(self) -> None:
        self._lanes.close()
        self._handles.close()
        for fd in self._dirs:
            os.close(fd)
        self._dirs = []

    def _open(self, key: str, flags: int) -> int:
        shard, name = _name(key)
        return os.open(name, flags, 0o600, dir_fd=self._dirs[shard])

    def _acquire(self, key: str, create: bool) -> int:
        def opener() -> int:
            if create:
                return self._open(key, os.O_RDWR | os.O_CREAT)
            try:
                return self._open(key, os.O_RDWR)
            except PermissionError:
                return self._open(key, os.O_RDONLY)  # a tier we may only read

        return self._handles.acquire(key, opener)

    # -- one chunk -------------------------------------------------------------------------
    # The common case (a chunk of one segment, page cache) is one system call each way and
    # little Python around it: with two lanes, the Python a lane runs holding the GIL is
    # what bounds throughput (about 10 us per chunk costs a third of it here).
    def put(self, key: str, data: memoryview, lanes: int | None = None) -> None:
        """Store a chunk, in place.

        Raises:
            StorageFullError: no space for it; the copy the key held before is intact.
            StorageError: the file could not be opened or written (key and file named).
        """
        kb = chunk.key_bytes(key)
        klen = len(kb)
        dlen = data.nbytes
        head = chunk.head(kb, dlen)
        off = len(head)
        nseg = chunk.segments(dlen)
        try:
            fd = self._acquire(key, create=True)
        except OSError as exc:
            raise _failed(self.root, key, "open", exc) from None
        try:
            old = os.fstat(fd).st_size
            if old < chunk.total_size(klen, dlen):
                self._reserve(key, fd, old, chunk.total_size(klen, dlen))
            if nseg <= 1 and not self.direct:
                # one system call: the kernel fills the pages in order, the digests last
                seg = _hash.digest(data) if nseg else b""
                parts: list[Any] = [head, data, seg, chunk.final_digest(head, klen, seg)]
                if os.pwritev(fd, parts, 0) != off + dlen + len(seg) + DIGEST:
                    files.write_all(fd, parts, 0)  # a short write (signals, quotas): finish it
            else:
                seg = self._put_segments(key, fd, head, klen, data, lanes)
            end = off + dlen + len(seg) + DIGEST
            if old > end:
                os.ftruncate(fd, end)  # the old chunk was longer
            self._handles.remember(key, end)
            if self.fsync == "always":
                os.fsync(fd)
        except OSError as exc:  # past the reservation: the chunk reads as a miss, never torn
            raise _failed(self.root, key, "write", exc) from None
        finally:
            self._handles.release(key, fd)

    def _reserve(self, key: str, fd: int, old: int, end: int) -> None:
        """Allocate the file's new length before any byte of the old chunk is overwritten."""
        try:
            os.posix_fallocate(fd, old, end - old)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return  # this filesystem cannot reserve: write and see
            try:
                os.ftruncate(fd, old)  # give back what it allocated; the old bytes stay
                if old == 0:  # a new chunk: leave no empty file behind
                    self._handles.drop(key)
                    shard, name = _name(key)
                    os.unlink(name, dir_fd=self._dirs[shard])
            except OSError:
                pass
            err = _failed(self.root, key, "reserve", exc)
            if old:
                err.args = (f"{err.args[0]}; the copy it held before is intact",)
            raise err from None

    def _put_segments(
        self, key: str, fd: int, head: bytes, klen: int, data: memoryview, lanes: int | None
    ) -> bytes:
        """Write a chunk segment by segment over the lanes; the digests last."""
        off, dlen = len(head), data.nbytes
        nseg = chunk.segments(dlen)
        digests = bytearray(DIGEST * nseg)
        dfd = self._direct_fd(key, os.O_WRONLY) if self.direct and dlen else None
        try:
            files.write_all(fd, [head], 0)

            def segment(i: int) -> None:
                lo = i * SEGMENT
                hi = min(lo + SEGMENT, dlen)
                h = _hash.Checksum()
                for p in range(lo, hi, PIECE):
                    piece = data[p : min(p + PIECE, hi)]
                    h.update(piece)  # hashed, then copied while it is still in cache
                    out = fd if dfd is None else files.pick(fd, dfd, piece, off + p)
                    if os.pwrite(out, piece, off + p) != piece.nbytes:
                        files.write_all(out, [piece], off + p)
                digests[DIGEST * i : DIGEST * (i + 1)] = h.digest()

            self._spread(nseg, segment, lanes)
        finally:
            if dfd is not None:
                os.close(dfd)
        seg = bytes(digests)
        files.write_all(fd, [seg, chunk.final_digest(head, klen, seg)], off + dlen)  # the digests last
        return seg

    def get(self, key: str, into: memoryview | None, lanes: int | None = None) -> bytes | int | None:
        """Read a chunk: into `into` (returns its length) or as bytes; None on a miss.

        A chunk that fails its checks counts as a miss (with a warning). A chunk of one
        segment is read with one ``preadv`` (header, key, data and digests land in their
        places at once, the data straight in the caller's buffer); larger ones are read
        segment by segment over the lanes, each segment checked as it arrives. A kept handle
        remembers the file's size, which saves an fstat per read; a stale size (another
        writer) fails the checks and the read is made once more with a fresh one.
        """
        kb = chunk.key_bytes(key)
        try:
            fd = self._acquire(key, create=False)
        except FileNotFoundError:
            return None
        except OSError as exc:  # a directory where the chunk should be, no permission, EIO
            raise _failed(self.root, key, "open", exc) from None
        try:
            hint = self._handles.size_of(key)
            try:
                return self._read(fd, kb, into, lanes, hint)
            except Corrupt as exc:
                if hint < 0:
                    raise
                log.debug("kvstore: %r changed under its kept handle (%s); reading again", key, exc)
                return self._read(fd, kb, into, lanes, -1)
        except Corrupt as exc:
            _zero(into)
            self._bad(key, str(exc))
            return None
        except OSError as exc:
            _zero(into)
            raise _failed(self.root, key, "read", exc) from None
        finally:
            self._handles.release(key, fd)

    def _read(self, fd: int, kb: bytes, into: memoryview | None, lanes: int | None, size: int) -> int | bytes:
        key = kb.decode("utf-8", "surrogatepass")
        klen = len(kb)
        off = chunk.data_offset(klen)
        fresh = size < 0
        if fresh:
            size = os.fstat(fd).st_size
        dlen = chunk.data_len(size, klen)
        if dlen is None:
            raise Corrupt("truncated: no chunk has this file's length")
        if (into is None and dlen > SEGMENT) or (into is not None and into.nbytes < dlen):
            self._claim(fd, kb, dlen)  # the file's length is the one its header says
        if into is None:
            target = memoryview(bytearray(dlen))
        elif into.nbytes < dlen:
            raise InvalidBufferError(
                f"buffer of {into.nbytes} bytes for chunk {key!r} at {_path(self.root, key)} "
                f"is smaller than the chunk ({dlen})"
            )
        else:
            target = into[:dlen]
        nseg = chunk.segments(dlen)
        head = bytearray(off)
        foot = bytearray(DIGEST * (nseg + 1))
        if nseg <= 1 and not self.direct:
            views: list[Any] = [head, target, foot]
            if os.preadv(fd, views, 0) != size and files.preadv_all(fd, views, 0) != size:
                raise Corrupt("truncated while reading")
            chunk.check_head(head, kb, dlen)
            if nseg and _hash.digest(target) != foot[:DIGEST]:
                raise Corrupt("checksum mismatch")
        else:
            self._get_segments(key, fd, head, kb, target, foot, lanes)
        chunk.check_digests(head, kb, foot)
        if fresh:
            self._handles.remember(key, size)
        return dlen if into is not None else bytes(target)

    @staticmethod
    def _claim(fd: int, kb: bytes, dlen: int) -> None:
        """Check the header before trusting the file's length: an extended or cut file is
        corrupt, not a chunk too large for the buffer or for memory."""
        head = bytearray(chunk.data_offset(len(kb)))
        if files.preadv_all(fd, [head], 0) < len(head):
            raise Corrupt("truncated header")
        chunk.check_head(head, kb, dlen)

    def _get_segments(
        self,
        key: str,
        fd: int,
        head: bytearray,
        kb: bytes,
        target: memoryview,
        foot: bytearray,
        lanes: int | None,
    ) -> None:
        """Read a chunk segment by segment over the lanes, each checked as it arrives."""
        off, dlen = len(head), target.nbytes
        if files.preadv_all(fd, [head], 0) < off:
            raise Corrupt("truncated header")
        chunk.check_head(head, kb, dlen)
        if files.preadv_all(fd, [foot], off + dlen) < len(foot):
            raise Corrupt("truncated digests")
        dfd = self._direct_fd(key, os.O_RDONLY) if self.direct else None
        bad: list[int] = []

        def segment(i: int) -> None:
            lo = i * SEGMENT
            hi = min(lo + SEGMENT, dlen)
            h = _hash.Checksum()
            for p in range(lo, hi, PIECE):
                piece = target[p : min(p + PIECE, hi)]
                src = fd if dfd is None else files.pick(fd, dfd, piece, off + p)
                n = os.preadv(src, [piece], off + p)
                if n != piece.nbytes and files.preadv_all(src, [piece[n:]], off + p + n) < piece.nbytes - n:
                    bad.append(i)
                    return
                h.update(piece)  # checked while it is still in cache
            if h.digest() != foot[DIGEST * i : DIGEST * (i + 1)]:
                bad.append(i)

        try:
            self._spread(chunk.segments(dlen), segment, lanes)
        finally:
            if dfd is not None:
                os.close(dfd)
        if bad:
            raise Corrupt(f"checksum mismatch in segment {min(bad)}")

    def _bad(self, key: str, why: str) -> None:
        with self._handles._lock:  # lanes may find two at once
            self.corrupt += 1
        log.warning(
            "kvstore: chunk %r at %s is corrupt or incomplete (%s): a miss", key, _path(self.root, key), why
        )

    def _direct_fd(self, key: str, flags: int) -> int | None:
        try:
            return self._open(key, flags | os.O_DIRECT)
        except OSError as exc:
            log.warning("kvstore: O_DIRECT refused under %s (%s): the page cache it is", self.root, exc)
            self.direct = False
            return None

    def contains(self, key: str) -> bool:
        shard, name = _name(key)
        try:
            return stat.S_ISREG(os.stat(name, dir_fd=self._dirs[shard]).st_mode)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _failed(self.root, key, "look up", exc) from None

    def delete(self, key: str) -> bool:
        self._handles.drop(key)
        shard, name = _name(key)
        try:
            os.unlink(name, dir_fd=self._dirs[shard])
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _failed(self.root, key, "delete", exc) from None

    # -- parallel parts --------------------------------------------------------------------
    def _spread(self, count: int, fn: Callable[[int], None], lanes: int | None) -> None:
        """Run fn(0..count-1) over up to `lanes` contiguous parts, one in this thread."""

        def part(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                fn(i)

        self._lanes.spread(count, part, lanes)

    # Below this many bytes in a batch, one thread does it all (a hand-off costs more).
    SPLIT_MIN_BYTES = 1 << 20

    def _batch_lanes(self, sizes: Sequence[int]) -> int:
        """Lanes over chunks for a batch (1: chunk by chunk, each chunk using the lanes)."""
        total = sum(sizes)
        if len(sizes) < 2 or total < self.SPLIT_MIN_BYTES or max(sizes) * 2 > total:
            return 1
        return min(self.lanes, len(sizes))

    def put_many(self, items: Sequence[tuple[str, memoryview]]) -> list[errors.WeftError | None]:
        """Store every chunk; per key, None or its typed error (the others are stored)."""
        out: list[errors.WeftError | None] = [None] * len(items)
        lanes = self._batch_lanes([d.nbytes for _, d in items])
        if lanes == 1:
            _put_range(self, items, out, 0, len(items))
        else:
            self._lanes.spread(len(items), lambda lo, hi: _put_range(self, items, out, lo, hi), lanes)
        return out

    def get_many(self, keys: Sequence[str], intos: Sequence[memoryview | None]) -> list[Any]:
        """Per key: bytes, a length, None (a miss), or the key's typed error."""
        if len(keys) != len(intos):
            raise InvalidBufferError(f"{len(keys)} keys but {len(intos)} buffers")
        out: list[Any] = [None] * len(keys)
        sized = [b.nbytes for b in intos if b is not None]
        lanes = self._batch_lanes(sized) if len(sized) == len(intos) else min(self.lanes, len(keys))
        if lanes == 1:
            _get_range(self, keys, intos, out, 0, len(keys))
        else:
            self._lanes.spread(len(keys), lambda lo, hi: _get_range(self, keys, intos, out, lo, hi), lanes)
        return out


# The lanes of a batch of small chunks run these loops: the common case (a kept handle of
# known size, one segment, page cache, an overwrite that needs no new space) inline, with no
# call it can spare, because the Python a lane runs holding the GIL is what bounds two lanes;
# anything else goes the general way (`put`, `get`), which also counts and reports corrupt
# chunks. A key that fails gets its typed error in `out`; the loop goes on with the next.
def _put_range(
    tier: PosixTier, items: Sequence[tuple[str, memoryview]], out: list[Any], lo: int, hi: int
) -> None:
    handles, lock = tier._handles._open, tier._handles._lock
    digest, pack, header_size = _hash.digest, chunk.HEADER.pack, chunk.HEADER.size
    for i in range(lo, hi):
        key, data = items[i]
        try:
            dlen = data.nbytes
            with lock:
                entry = handles.get(key)
                if entry is not None:
                    entry[1] += 1
            if entry is None or not 0 < dlen <= SEGMENT or tier.direct:
                if entry is not None:
                    tier._handles.release(key, entry[0])
                tier.put(key, data, lanes=1)
                continue
            fd, grows = entry[0], False
            try:
                kb = key.encode("utf-8", "surrogatepass")
                klen = len(kb)
                if klen > chunk.MAX_KEY_BYTES:
                    raise errors.InvalidKeyError(f"key of {klen} bytes is longer than {chunk.MAX_KEY_BYTES}")
                lead = pack(chunk.MAGIC, chunk.FORMAT, chunk.SEGMENT_SHIFT, klen, dlen) + kb
                off = -(-(header_size + klen) // ALIGN) * ALIGN
                end = off + dlen + 2 * DIGEST
                old = os.fstat(fd).st_size
                grows = old < end
                if not grows:  # no new space needed: a full disk cannot fail it
                    seg = digest(data)
                    parts: list[Any] = [lead, _zeros(off - len(lead)), data, seg, digest(lead + seg)]
                    if os.pwritev(fd, parts, 0) != end:
                        files.write_all(fd, parts, 0)
                    if old > end:
                        os.ftruncate(fd, end)
                    entry[2] = end
                    if tier.fsync == "always":
                        os.fsync(fd)
            except OSError as exc:
                raise _failed(tier.root, key, "write", exc) from None
            finally:
                tier._handles.release(key, fd)
            if grows:
                tier.put(key, data, lanes=1)  # the general way reserves the space first
        except errors.WeftError as exc:
            out[i] = exc


def _get_range(
    tier: PosixTier,
    keys: Sequence[str],
    intos: Sequence[memoryview | None],
    out: list[Any],
    lo: int,
    hi: int,
) -> None:
    handles, lock = tier._handles._open, tier._handles._lock
    digest, unpack, header_size = _hash.digest, chunk.HEADER.unpack_from, chunk.HEADER.size
    expect = (chunk.MAGIC, chunk.FORMAT, chunk.SEGMENT_SHIFT)
    for i in range(lo, hi):
        key, into = keys[i], intos[i]
        try:
            with lock:
                entry = handles.get(key)
                if entry is not None:
                    entry[1] += 1
            if entry is None or entry[2] < 0 or into is None or tier.direct:
                if entry is not None:
                    tier._handles.release(key, entry[0])
                out[i] = tier.get(key, into, lanes=1)
                continue
            fd, size = entry[0], entry[2]
            try:
                kb = key.encode("utf-8", "surrogatepass")
                klen = len(kb)
                off = -(-(header_size + klen) // ALIGN) * ALIGN
                dlen = size - off - 2 * DIGEST
                if 0 < dlen <= SEGMENT and into.nbytes >= dlen:
                    head, foot = bytearray(off), bytearray(2 * DIGEST)
                    target = into if into.nbytes == dlen else into[:dlen]
                    if os.preadv(fd, [head, target, foot], 0) == size:
                        magic, fmt, shift, hk, hd = unpack(head)
                        lead = head[: header_size + klen]
                        if (
                            (magic, fmt, shift) == expect
                            and hk == klen
                            and hd == dlen
                            and lead[header_size:] == kb
                            and (seg := digest(target)) == foot[:DIGEST]
                            and digest(lead + seg) == foot[DIGEST:]
                        ):
                            out[i] = dlen
                            continue
            except OSError:
                pass  # the general way below reports it, typed
            finally:
                tier._handles.release(key, fd)
            out[i] = tier.get(key, into, lanes=1)  # anything unusual: the general way
        except errors.WeftError as exc:
            out[i] = exc


_ZEROS: dict[int, bytes] = {}


def _zeros(n: int) -> bytes:
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = bytes(n)
    return z
