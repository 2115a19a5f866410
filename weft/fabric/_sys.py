"""Operating-system helpers: host identity and cross-memory attach (process_vm_readv/writev).

Two agents on one host can copy between their address spaces with one system call per 1024
descriptors and one copy of the bytes (the kernel's "cross-memory attach", which UCX's `cma`
transport also uses). It needs the same PID namespace and ptrace permission over the peer,
which the caller proves with a probe read before trusting the path.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from dataclasses import dataclass
from functools import cache

import numpy as np
import numpy.typing as npt

IOV_MAX = 1024


@dataclass(frozen=True, slots=True)
class HostIdentity:
    """What makes two processes "on the same host" for cross-memory attach."""

    hostname: str
    boot_id: str
    pid_ns: str
    pid: int


@cache
def _static_host() -> tuple[str, str, str]:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = ""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    return socket.gethostname(), boot_id, pid_ns


def host_identity() -> HostIdentity:
    hostname, boot_id, pid_ns = _static_host()
    return HostIdentity(hostname=hostname, boot_id=boot_id, pid_ns=pid_ns, pid=os.getpid())


def same_host(a: HostIdentity, b: HostIdentity) -> bool:
    """True when cross-memory attach can address `b`'s pid from `a`."""
    return bool(a.boot_id) and a.boot_id == b.boot_id and bool(a.pid_ns) and a.pid_ns == b.pid_ns


class CrossMemoryError(OSError):
    """process_vm_readv/writev failed; errno says why (ESRCH: the process is gone)."""


@cache
def _libc() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(None, use_errno=True)
        for fn in (lib.process_vm_readv, lib.process_vm_writev):
            fn.restype = ctypes.c_ssize_t
            fn.argtypes = [
                ctypes.c_int,
                ctypes.c_void_p,
                ctypes.c_ulong,
                ctypes.c_void_p,
                ctypes.c_ulong,
                ctypes.c_ulong,
            ]
    except (OSError, AttributeError):
        return None
    return lib


def cma_supported() -> bool:
    return _libc() is not None


IovecArray = npt.NDArray[np.uint64]


def make_iovecs(bases: npt.NDArray[np.uint64], lengths: npt.NDArray[np.uint64]) -> IovecArray:
    """An array of `struct iovec {void *base; size_t len;}` laid out for the kernel."""
    iov = np.empty((len(bases), 2), dtype=np.uint64)
    iov[:, 0] = bases
    iov[:, 1] = lengths
    return iov


def cma_copy(write: bool, pid: int, local: IovecArray, remote: IovecArray) -> int:
    """Copy between this process (`local` iovecs) and `pid` (`remote` iovecs).

    Both arrays must have the same lengths, entry by entry. Runs without the GIL (ctypes releases
    it), in chunks of IOV_MAX descriptors.

    Returns:
        bytes copied.
    Raises:
        CrossMemoryError: the kernel refused (errno ESRCH: peer gone; EPERM: not permitted;
            EFAULT: an address is not mapped in one of the processes).
    """
    lib = _libc()
    if lib is None:
        raise CrossMemoryError(errno.ENOSYS, "process_vm_readv/writev not available")
    fn = lib.process_vm_writev if write else lib.process_vm_readv
    if local.shape != remote.shape or not np.array_equal(local[:, 1], remote[:, 1]):
        raise ValueError("local and remote iovecs must have matching lengths")
    return _copy_matched(fn, pid, local, remote)


def _copy_matched(fn: ctypes._NamedFuncPointer, pid: int, local: IovecArray, remote: IovecArray) -> int:
    total = 0
    n = len(local)
    for start in range(0, n, IOV_MAX):
        lo = np.ascontiguousarray(local[start : start + IOV_MAX])
        ro = np.ascontiguousarray(remote[start : start + IOV_MAX])
        want = int(lo[:, 1].sum())
        done = _call(fn, pid, lo, ro)
        while done < want:  # partial copy: only on a fault part-way; retry the rest once
            lo2, ro2 = _advance(lo, done), _advance(ro, done)
            more = _call(fn, pid, lo2, ro2)
            if more == 0:
                raise CrossMemoryError(errno.EFAULT, "cross-memory copy made no progress")
            done += more
        total += done
    return total


def _call(fn: ctypes._NamedFuncPointer, pid: int, lo: IovecArray, ro: IovecArray) -> int:
    got = int(fn(pid, lo.ctypes.data, len(lo), ro.ctypes.data, len(ro), 0))
    if got < 0:
        err = ctypes.get_errno()
        raise CrossMemoryError(err, os.strerror(err))
    return got


def _advance(iov: IovecArray, skip: int) -> IovecArray:
    """The iovecs left after the first `skip` bytes."""
    ends = np.cumsum(iov[:, 1])
    first = int(np.searchsorted(ends, skip, side="right"))
    rest = iov[first:].copy()
    before = int(ends[first - 1]) if first else 0
    cut = skip - before
    rest[0, 0] += np.uint64(cut)
    rest[0, 1] -= np.uint64(cut)
    return rest


def split_iovecs(local: IovecArray, remote: IovecArray, parts: int) -> list[tuple[IovecArray, IovecArray]]:
    """Cut matched iovec lists into `parts` pieces of about equal bytes (for parallel copies)."""
    lengths = local[:, 1].astype(np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    total = int(ends[-1])
    out = []
    for j in range(parts):
        lo, hi = total * j // parts, total * (j + 1) // parts
        if hi <= lo:
            continue
        i0 = int(np.searchsorted(ends, lo, side="right"))
        i1 = int(np.searchsorted(starts, hi, side="left"))
        seg_l, seg_r = local[i0:i1].copy(), remote[i0:i1].copy()
        head = np.uint64(lo - int(starts[i0]))
        tail = np.uint64(int(ends[i1 - 1]) - hi)
        for seg in (seg_l, seg_r):
            seg[0, 0] += head
            seg[0, 1] -= head
            seg[-1, 1] -= tail
        out.append((seg_l, seg_r))
    return out
