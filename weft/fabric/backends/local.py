"""The `local` backend: same-host copies with cross-memory attach (process_vm_readv/writev).

One system call moves up to 1024 descriptors straight between the two address spaces, one
copy, no socket, at memory speed. Used when both agents run on one host in one PID
namespace and a probe read of the peer's token succeeded (ptrace permission). The control
stream still carries notifications and tells us when the peer dies.

Safety: the initiator checks every descriptor against the target's published regions, and
a target that deregisters a region tells its peers at once; like any RDMA library, a target
must not free memory a peer is still writing to.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from weft.fabric import _sys, errors, wire
from weft.fabric.transfer import Joint
from weft.fabric.types import Backend, MemoryKind, Op

if TYPE_CHECKING:
    from weft.fabric.backend import BackendHost
    from weft.fabric.memory import DescList
    from weft.fabric.peers import Peer
    from weft.fabric.transfer import Transfer

log = logging.getLogger(__name__)

#: Requests at least this large are split over the worker threads (one copy per core).
PARALLEL_BYTES = 4 << 20


class _Pending:
    """The pieces of one transfer not started yet; each is taken once, by a worker or by a
    caller that polls or waits on the transfer (`Transfer.assist`)."""

    def __init__(self, jobs: list[Callable[[], None]]) -> None:
        self._jobs = collections.deque(jobs)
        self._lock = threading.Lock()

    def run_one(self) -> bool:
        with self._lock:
            if not self._jobs:
                return False
            job = self._jobs.popleft()
        job()
        return True


@dataclass(frozen=True, slots=True)
class LocalPlan:
    op: Op
    peer: Peer
    remote_region: int
    local_iov: _sys.IovecArray
    remote_iov: _sys.IovecArray
    total: int
    pieces: list[tuple[_sys.IovecArray, _sys.IovecArray]]  # copied in parallel when large


class LocalBackend:
    kind = Backend.LOCAL

    def __init__(self, host: BackendHost) -> None:
        if not _sys.cma_supported():
            raise ImportError("process_vm_readv/writev is not available on this system")
        self.host = host
        self._jobs: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()

    def usable(self, peer: Peer, local: MemoryKind, remote: MemoryKind) -> bool:
        if local is not MemoryKind.DRAM or remote is not MemoryKind.DRAM:
            return False
        return peer.cross_memory_ok()

    def plan(self, op: Op, local: DescList, peer: Peer, remote: DescList) -> LocalPlan:
        region = self.host.local_region(local)
        rregion = peer.region_by_id(remote.region_id)
        local_iov = _sys.make_iovecs(np.uint64(region.addr) + local.offsets, local.lengths)
        remote_iov = _sys.make_iovecs(np.uint64(rregion.addr) + remote.offsets, remote.lengths)
        workers = self.host.config.local_workers
        parts = workers if local.total >= PARALLEL_BYTES and workers > 1 else 1
        pieces = _sys.split_iovecs(local_iov, remote_iov, parts) if parts > 1 else []
        return LocalPlan(op, peer, remote.region_id, local_iov, remote_iov, local.total, pieces)

    def post(self, plan: LocalPlan, transfer: Transfer, notify: bytes | None) -> None:
        if plan.total <= self.host.config.inline_bytes:
            self._run(plan, transfer, notify)
            return
        self._ensure_workers()
        if not plan.pieces:
            jobs: list[Callable[[], None]] = [lambda: self._run(plan, transfer, notify)]
        else:
            joint = Joint(len(plan.pieces), lambda err: self._end(plan, transfer, notify, err))
            jobs = [functools.partial(self._piece, joint, plan, liov, riov) for liov, riov in plan.pieces]
        pending = _Pending(jobs)
        transfer.on_assist(pending.run_one)  # a caller polling or waiting takes pieces too
        for _ in jobs:
            self._jobs.put(pending.run_one)

    def _piece(self, joint: Joint, plan: LocalPlan, liov: _sys.IovecArray, riov: _sys.IovecArray) -> None:
        joint.done(self._copy(plan, liov, riov))

    def _copy(self, plan: LocalPlan, liov: _sys.IovecArray, riov: _sys.IovecArray) -> errors.WeftError | None:
        """Copy (all or one piece of) a request; returns its error instead of finishing it."""
        try:
            plan.peer.region_by_id(plan.remote_region)  # deregistered since the plan was made?
            plan.peer.check_alive()
            _sys.cma_copy(plan.op is Op.WRITE, plan.peer.pid, liov, riov)
        except _sys.CrossMemoryError as exc:
            return self._translate(plan.peer, exc)
        except errors.WeftError as exc:
            return exc
        return None

    def _end(
        self, plan: LocalPlan, transfer: Transfer, notify: bytes | None, err: errors.WeftError | None
    ) -> None:
        if err is None and notify is not None:
            try:
                plan.peer.stream().send_now([wire.header(wire.NOTIFY, length=len(notify)), notify])
            except errors.WeftError as exc:
                err = exc
        transfer.complete(err)

    def _run(self, plan: LocalPlan, transfer: Transfer, notify: bytes | None) -> None:
        self._end(plan, transfer, notify, self._copy(plan, plan.local_iov, plan.remote_iov))

    def _translate(self, peer: Peer, exc: _sys.CrossMemoryError) -> errors.WeftError:
        if exc.errno == errno.ESRCH:
            err: errors.WeftError = errors.PeerLostError(f"peer {peer.name!r} (pid {peer.pid}) is gone")
            peer.lost(err)
            return err
        if exc.errno == errno.EPERM:
            peer.disable_cross_memory(f"not permitted: {exc}")
            return errors.BackendUnavailableError(f"cross-memory attach to {peer.name!r} not permitted")
        return errors.RemoteError(
            f"cross-memory copy with {peer.name!r} failed: {exc}", errors.ErrorCode.BACKEND
        )

    def _ensure_workers(self) -> None:
        if self._workers:
            return
        with self._lock:
            while len(self._workers) < self.host.config.local_workers:
                t = threading.Thread(target=self._work, name=f"weft-local {self.host.name}", daemon=True)
                t.start()
                self._workers.append(t)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()  # a piece, or nothing if a caller took it first
            if job is None:
                return
            try:
                job()
            except Exception:  # a job finishes its transfer itself; this is a bug, say so
                log.exception("agent %s: local transfer job crashed", self.host.name)

    def endpoint(self) -> str | None:
        return None

    def close(self) -> None:
        for _ in self._workers:
            self._jobs.put(None)
