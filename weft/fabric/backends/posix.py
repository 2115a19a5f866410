"""The `posix` storage backend: FILE memory, moved with preadv/pwritev on the file engine.

A FILE region is raw bytes at the caller's offsets (NIXL's POSIX semantics: no header, no
format). A request is laid out once: its descriptors become runs of consecutive file
offsets, each run one ``preadv``/``pwritev`` of the caller's buffers (up to 1024 of them),
with no copy. The posting thread moves the bytes (see `PosixBackend.post`); requests of at
least `PARALLEL_BYTES` are split, and the lanes of `weft.fabric.files` (the engine the KV
store's POSIX tier runs on) move all parts but the poster's own.

Parameters (strings, as NIXL passes them): ``lanes`` (threads; default the CPU count),
``direct`` (``O_DIRECT`` for runs whose buffers, offset and length are 4096-aligned; the page
cache for the rest), ``staging_bytes`` (largest VRAM request, staged through host memory).
NIXL's own POSIX parameters (``use_aio``, ``use_uring``, ``use_posix_aio``,
``kernel_queue_size``, ``ios_pool_size``) have no effect: the lanes do the asynchronous part.
Other keys are ignored with one log line naming them, as NIXL's plugins ignore what they do
not know: clients pass their own settings through (LMCache's L2 adapter passes ``file_path``
and ``use_direct_io`` and opens the files itself).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from weft.api.vocab import StorageBackend
from weft.fabric import errors, files, storage
from weft.fabric.transfer import Joint
from weft.fabric.types import MemoryKind, Op

if TYPE_CHECKING:
    from weft.fabric.backend import BackendHost
    from weft.fabric.memory import DescList, Region
    from weft.fabric.transfer import Transfer

log = logging.getLogger(__name__)

#: Requests at least this large are split over the lanes.
PARALLEL_BYTES = 4 << 20
#: Batches at least this large (`post_batch`) are shared out over the lanes.
BATCH_BYTES = 1 << 20
#: Buffers one preadv/pwritev takes at most (Linux's IOV_MAX).
IOV_MAX = 1024

_NIXL_PARAMS = frozenset({"use_aio", "use_uring", "use_posix_aio", "kernel_queue_size", "ios_pool_size"})

#: A run: its file, where it starts in the file, the buffers it fills or drains in order, and
#: whether O_DIRECT may carry it.
Run = tuple[storage.FileHandle, int, list[memoryview], bool]


def flag(params: Mapping[str, Any], key: str, default: bool) -> bool:
    """A boolean parameter given as NIXL gives them ("true", "1", "yes", ...) or as a bool."""
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise errors.ConfigError(f"parameter {key}={value!r} is not a boolean")


def count(params: Mapping[str, Any], key: str, default: int, lo: int = 1) -> int:
    """An integer parameter (string or int) of at least `lo`."""
    value = params.get(key)
    if value is None:
        return default
    try:
        n = int(str(value).strip())
    except ValueError:
        raise errors.ConfigError(f"parameter {key}={value!r} is not an integer") from None
    if n < lo:
        raise errors.ConfigError(f"parameter {key}={n} must be >= {lo}")
    return n


@dataclass(slots=True)
class PosixPlan:
    op: Op
    runs: list[Run]
    parts: list[list[Run]]  # the runs split for the lanes; empty: one part
    total: int
    stage: list[Any]  # VRAM pairs: (local region, local offsets, host views) each


class PosixBackend:
    kind = StorageBackend.POSIX
    memory = MemoryKind.FILE

    def __init__(self, host: BackendHost, params: Mapping[str, Any]) -> None:
        unknown = sorted(set(params) - {"lanes", "direct", "staging_bytes"} - _NIXL_PARAMS)
        if unknown:
            log.info("agent %s: the posix backend ignores parameters %s", host.name, unknown)
        self.host = host
        self.direct = flag(params, "direct", False)
        self.staging_bytes = count(params, "staging_bytes", 256 << 20)
        self._lanes = files.Lanes(count(params, "lanes", os.cpu_count() or 1), f"weft-posix {host.name}")
        self._closed = False
        self._direct_lock = threading.Lock()
        self._direct_fds: dict[int, int] = {}  # id(handle) -> O_DIRECT descriptor

    # -- laying a request out -------------------------------------------------------------
    def plan(self, op: Op, local: DescList, store: DescList) -> PosixPlan:
        return self.plan_batch(op, [(local, store)])

    def plan_batch(self, op: Op, pairs: list[tuple[DescList, DescList]]) -> PosixPlan:
        runs: list[Run] = []
        stage: list[Any] = []
        total = 0
        for local, store in pairs:
            runs += self._lay_out(local, store, stage)
            total += local.total
        split = total >= PARALLEL_BYTES and self._lanes.lanes > 1
        parts = _split(runs, self._lanes.lanes) if split else []
        return PosixPlan(op, runs, parts, total, stage)

    def _lay_out(self, local: DescList, store: DescList, stage: list[Any]) -> list[Run]:
        """One (memory, file) pair as runs; a VRAM pair adds its host staging to `stage`."""
        region = self.host.local_region(local)
        file_region = self.host.local_region(store)
        handle = file_region.keepalive
        if not isinstance(handle, storage.FileHandle):
            raise errors.InvalidDescriptorError(f"region {file_region.label} is not a FILE region")
        if len(local) != len(store):
            raise errors.InvalidDescriptorError(
                f"local and file descriptors must match one to one ({len(local)} and {len(store)})"
            )
        starts = (store.offsets + np.uint64(handle.offset)).tolist()
        lengths = store.lengths.tolist()
        views = host_views(region, local, lengths, self.staging_bytes, stage, "posix", "FILE")
        return _runs(handle, starts, views, self.direct)

    # -- moving ---------------------------------------------------------------------------
    def post(self, plan: PosixPlan, transfer: Transfer, notify: bytes | None) -> None:
        """Move the bytes now, in the posting thread, with the lanes' help for a large request.

        A page-cache copy is the work itself, and the poster's thread is free to do it: NIXL's
        POSIX plugin does the same (buffered AIO completes in the submitting call), and
        clients poll with a sleep between checks (LMCache: 1 ms), so a transfer that is DONE
        when `post` returns is the fast path. The wait for the lanes' parts is bounded by the
        transfer's deadline; past it `post` returns and the transfer ends as it ends.
        """
        if self._closed:
            raise errors.AgentClosedError(f"agent {self.host.name!r}: posix backend closed")
        if plan.stage and plan.op is Op.WRITE:
            stage_out(self.host, plan.stage)
        if not plan.parts:
            self._end(plan, transfer, notify, self._move(plan, plan.runs))
            return
        joint = Joint(len(plan.parts), functools.partial(self._end, plan, transfer, notify))
        for part in plan.parts[1:]:
            self._lanes.submit(functools.partial(self._part, plan, part, joint))
        self._part(plan, plan.parts[0], joint)
        joint.finished.wait(max(0.0, transfer.deadline - time.monotonic()))

    def post_batch(self, items: list[tuple[PosixPlan, Transfer, bytes | None]]) -> None:
        """Several requests at once: contiguous shares of them go to the lanes, whole (a large
        request is not split again), the first share is moved in this thread. LMCache puts 64
        chunks, one file each, in one NIXL request: one request at a time would leave every
        core but one idle. The wait for the lanes is bounded by the earliest deadline."""
        if self._closed:
            raise errors.AgentClosedError(f"agent {self.host.name!r}: posix backend closed")
        total = sum(plan.total for plan, _, _ in items)
        lanes = min(self._lanes.lanes, len(items))
        if lanes < 2 or total < BATCH_BYTES:
            for plan, transfer, notify in items:
                self._post_one(plan, transfer, notify)
            return
        bounds = [len(items) * j // lanes for j in range(lanes + 1)]
        joint = Joint(lanes - 1, lambda _err: None)
        for j in range(1, lanes):
            share = items[bounds[j] : bounds[j + 1]]
            self._lanes.submit(functools.partial(self._share, share, joint))
        self._share(items[bounds[0] : bounds[1]], None)
        deadline = min(t.deadline for _, t, _ in items)
        joint.finished.wait(max(0.0, deadline - time.monotonic()))

    def _share(self, share: list[tuple[PosixPlan, Transfer, bytes | None]], joint: Joint | None) -> None:
        try:
            for plan, transfer, notify in share:
                if plan.stage and plan.op is Op.WRITE:
                    try:
                        stage_out(self.host, plan.stage)
                    except errors.WeftError as exc:
                        transfer.complete(exc)
                        continue
                self._end(plan, transfer, notify, self._move(plan, plan.runs))
        finally:
            if joint is not None:
                joint.done(None)

    def _post_one(self, plan: PosixPlan, transfer: Transfer, notify: bytes | None) -> None:
        try:
            self.post(plan, transfer, notify)
        except errors.WeftError as exc:
            transfer.complete(exc)

    def _part(self, plan: PosixPlan, part: list[Run], joint: Joint) -> None:
        joint.done(self._move(plan, part))

    def _end(
        self, plan: PosixPlan, transfer: Transfer, notify: bytes | None, err: errors.WeftError | None
    ) -> None:
        if err is None and plan.stage and plan.op is Op.READ:
            try:
                stage_in(self.host, plan.stage)
            except errors.WeftError as exc:
                err = exc
        if transfer.complete(err) and err is None and notify is not None:
            self.host.deliver(self.host.name, notify)

    def _move(self, plan: PosixPlan, runs: list[Run]) -> errors.WeftError | None:
        """Move some runs of a request; returns the error instead of raising it."""
        write = plan.op is Op.WRITE
        for handle, off, views, direct in runs:
            try:
                fd = handle.acquire()
            except errors.WeftError as exc:
                return exc
            try:
                dfd = self._direct_fd(handle, fd) if direct else None
                _io(fd if dfd is None else dfd, off, views, write, handle)
            except errors.WeftError as exc:
                return exc
            finally:
                handle.done()
        return None

    def _direct_fd(self, handle: storage.FileHandle, fd: int) -> int | None:
        key = id(handle)
        with self._direct_lock:
            dfd = self._direct_fds.get(key)
            if dfd is not None:
                return dfd
            try:
                dfd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:
                try:
                    dfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
                except OSError:
                    return None  # the filesystem refuses O_DIRECT (tmpfs): the page cache it is
            self._direct_fds[key] = dfd
            handle.on_release(lambda: self._drop_direct(key))
            return dfd

    def _drop_direct(self, key: int) -> None:
        with self._direct_lock:
            dfd = self._direct_fds.pop(key, None)
        if dfd is not None:
            os.close(dfd)

    # -- queries and lifetime -------------------------------------------------------------
    def query(self, spec: storage.FileRegion | storage.ObjectRegion) -> storage.StorageInfo | None:
        if not isinstance(spec, storage.FileRegion):
            raise errors.InvalidDescriptorError("the posix backend answers for FileRegion, not ObjectRegion")
        try:
            st = os.stat(spec.path) if spec.path is not None else os.fstat(spec.fd or 0)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise errors.StorageError(f"cannot stat {spec.path or f'fd {spec.fd}'}: {exc.strerror}") from None
        return storage.StorageInfo(size=max(0, st.st_size - spec.offset))

    def close(self) -> None:
        self._closed = True
        self._lanes.close()
        with self._direct_lock:
            fds, self._direct_fds = list(self._direct_fds.values()), {}
        for dfd in fds:
            os.close(dfd)


def _io(fd: int, off: int, views: list[memoryview], write: bool, handle: storage.FileHandle) -> None:
    total = sum(v.nbytes for v in views)
    try:
        if write:
            if os.pwritev(fd, views, off) != total:
                files.write_all(fd, list(views), off)  # a short write (signals, quotas): finish it
            return
        if os.preadv(fd, views, off) == total:
            return
        got = files.preadv_all(fd, list(views), off)
    except OSError as exc:
        where = handle.path or f"fd {handle.fd}"
        what = "write" if write else "read"
        reason = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise errors.StorageError(f"{what} of {total} bytes at offset {off} of {where}: {reason}") from None
    if got < total:
        where = handle.path or f"fd {handle.fd}"
        raise errors.StorageError(
            f"read of {total} bytes at offset {off} of {where} reached the end of the file after {got}"
        )


def _runs(handle: storage.FileHandle, starts: list[int], views: list[memoryview], direct: bool) -> list[Run]:
    """Group descriptors whose file ranges follow each other into runs of <= IOV_MAX buffers."""
    grouped: list[tuple[int, list[memoryview]]] = []
    end = -1
    for off, view in zip(starts, views, strict=True):
        if off == end and len(grouped[-1][1]) < IOV_MAX:
            grouped[-1][1].append(view)
        else:
            grouped.append((off, [view]))
        end = off + view.nbytes
    return [(handle, off, vs, direct and _aligned(off, vs)) for off, vs in grouped]


def _split(runs: list[Run], parts: int) -> list[list[Run]]:
    """Cut runs into `parts` lists of about equal bytes (a run may be cut inside a buffer)."""
    total = sum(v.nbytes for _, _, vs, _ in runs for v in vs)
    share = -(-total // parts)
    share = -(-share // files.ALIGN) * files.ALIGN  # cuts on page boundaries
    out: list[list[Run]] = [[]]
    room = share
    for handle, off, views, direct in runs:
        current: list[memoryview] = []
        start = off
        for view in views:
            v = view
            while v.nbytes:
                take = min(v.nbytes, room)
                current.append(v[:take])
                v = v[take:]
                room -= take
                if room == 0:
                    out[-1].append((handle, start, current, direct))
                    start += sum(c.nbytes for c in current)
                    current = []
                    out.append([])
                    room = share
        if current:
            out[-1].append((handle, start, current, direct))
    return [p for p in out if p]


def _aligned(off: int, views: list[memoryview]) -> bool:
    if off % files.ALIGN:
        return False
    return all(
        v.nbytes % files.ALIGN == 0 and np.frombuffer(v, np.uint8).ctypes.data % files.ALIGN == 0
        for v in views
    )


def host_views(
    region: Region, local: DescList, lengths: list[int], limit: int, stage: list[Any], name: str, to: str
) -> list[memoryview]:
    """The host buffers a request moves: slices of a DRAM region, or for VRAM a staging
    buffer (at most `limit` bytes) whose pieces `stage_out`/`stage_in` copy (added to `stage`)."""
    if region.kind is MemoryKind.DRAM:
        base = region.view
        return [base[o : o + n] for o, n in zip(local.offsets.tolist(), lengths, strict=True)]
    if region.kind is not MemoryKind.VRAM:
        raise errors.BackendUnavailableError(f"{name} moves DRAM or VRAM to {to}, not {region.kind.value}")
    if local.total > limit:
        raise errors.InvalidDescriptorError(
            f"a VRAM request of {local.total} bytes exceeds the staging limit (staging_bytes={limit})"
        )
    buf = np.empty(local.total, np.uint8).data
    views, at = [], 0
    for n in lengths:
        views.append(buf[at : at + n])
        at += n
    stage.append((region, local.offsets.tolist(), views))
    return views


def stage_out(host: BackendHost, stage: list[Any]) -> None:
    """Copy VRAM pairs into their host staging (before a WRITE)."""
    for region, offsets, views in stage:
        for off, view in zip(offsets, views, strict=True):
            host.device_to_host(region, off, view)


def stage_in(host: BackendHost, stage: list[Any]) -> None:
    """Copy host staging back into VRAM pairs (after a READ)."""
    for region, offsets, views in stage:
        for off, view in zip(offsets, views, strict=True):
            host.host_to_device(view, region, off)
