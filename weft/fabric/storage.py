"""FILE and OBJ memory: what a caller registers to move bytes to and from storage.

NIXL's promise is one API over memory and storage; weft keeps it. A file or an S3 object is
registered like a buffer (`Agent.register(FileRegion(...))`) and moved with the same
prepare/post/READ/WRITE, deadlines and typed errors, the agent itself being the "peer"
(`agent.prepare(op, dram.descs(), agent.name, file.descs())`).

A FILE region is raw bytes at the caller's offsets, with no header and no format of ours,
as NIXL's POSIX backend does: descriptor (offset, length) of the region is file offset
``region.offset + offset``. An OBJ region is one object by key; a WRITE replaces the object
(S3 has no partial writes), a READ fetches byte ranges.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from weft.fabric import errors

#: The size of a region whose length is not known ("to wherever the file or object goes").
UNBOUNDED = 1 << 62


@dataclasses.dataclass(frozen=True, slots=True)
class FileRegion:
    """A byte range of a file, by open descriptor or by path.

    Attributes:
        fd: an open file descriptor (the caller keeps it open while it is registered).
        path: a file to open (read-write; created if `create`); weft closes it on release.
        offset: where the region starts in the file.
        length: bytes in the region; None: unbounded (reads past the end of the file fail).
        create: create the file at `path` if it is missing.
        readonly: refuse WRITEs into it (a path is then opened read-only).
    """

    fd: int | None = None
    path: str | os.PathLike[str] | None = None
    offset: int = 0
    length: int | None = None
    create: bool = False
    readonly: bool = False

    def __post_init__(self) -> None:
        if (self.fd is None) == (self.path is None):
            raise errors.InvalidBufferError("FileRegion needs exactly one of fd= and path=")
        if self.fd is not None and (not isinstance(self.fd, int) or self.fd < 0):
            raise errors.InvalidBufferError(f"FileRegion fd must be a descriptor >= 0, got {self.fd!r}")
        _check_range(self.offset, self.length, "FileRegion")


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectRegion:
    """One object of the `obj` backend's bucket, by key.

    Attributes:
        key: the object's key (the backend's prefix, if any, goes in front).
        size: bytes in the region; None: unbounded (a READ past the object's end fails).
        readonly: refuse WRITEs into it.
    """

    key: str
    size: int | None = None
    readonly: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key or len(self.key.encode()) > 1024:
            raise errors.InvalidBufferError(
                f"ObjectRegion key must be 1..1024 bytes of text, got {self.key!r}"
            )
        _check_range(0, self.size, "ObjectRegion")


@dataclasses.dataclass(frozen=True, slots=True)
class StorageInfo:
    """What a query found: the file or object exists and has `size` bytes."""

    size: int


def _check_range(offset: int, length: int | None, what: str) -> None:
    if not isinstance(offset, int) or offset < 0:
        raise errors.InvalidBufferError(f"{what} offset must be an integer >= 0, got {offset!r}")
    if length is not None and (not isinstance(length, int) or length <= 0 or length > UNBOUNDED):
        raise errors.InvalidBufferError(f"{what} length must be a positive integer or None, got {length!r}")


class FileHandle:
    """A registered file's descriptor, shared by the transfers that use it.

    `release` (the region's deregistration) closes it when weft opened it, but never under a
    transfer: the last `done` closes it then, so a descriptor number is never reused while
    a transfer still writes through it.
    """

    __slots__ = ("_hooks", "_lock", "_released", "_users", "fd", "offset", "owned", "path")

    def __init__(self, fd: int, offset: int, owned: bool, path: str | None) -> None:
        self.fd = fd
        self.offset = offset
        self.owned = owned
        self.path = path
        self._lock = threading.Lock()
        self._users = 0
        self._released = False
        self._hooks: list[Callable[[], None]] = []

    def acquire(self) -> int:
        """The descriptor, held until `done`. Raises RegistrationError after `release`."""
        with self._lock:
            if self._released:
                raise errors.RegistrationError(f"file region {self.path or f'fd {self.fd}'} was deregistered")
            self._users += 1
            return self.fd

    def done(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._released and self._users == 0
        if last:
            self._close()

    def on_release(self, hook: Callable[[], None]) -> None:
        """Run `hook` when the descriptor closes (a backend's own descriptors of the file)."""
        with self._lock:
            self._hooks.append(hook)

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
            idle = self._users == 0
        if idle:
            self._close()

    def _close(self) -> None:
        with self._lock:
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()
        if self.owned:
            os.close(self.fd)


def open_file(spec: FileRegion) -> tuple[FileHandle, int, bool]:
    """Open (or adopt) the file of `spec`: (handle, region size, readonly).

    Raises:
        InvalidBufferError: the path or descriptor is unusable, or it is not a regular file.
    """
    owned = spec.path is not None
    where = str(spec.path) if spec.path is not None else f"fd {spec.fd}"
    try:
        if spec.path is not None:
            flags = os.O_RDONLY if spec.readonly else os.O_RDWR | (os.O_CREAT if spec.create else 0)
            fd = os.open(Path(spec.path), flags | os.O_CLOEXEC, 0o600)
        else:
            assert spec.fd is not None
            fd = spec.fd
        st = os.fstat(fd)
    except OSError as exc:
        raise errors.InvalidBufferError(f"cannot register file {where}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISBLK(st.st_mode):
            raise errors.InvalidBufferError(f"cannot register {where}: not a regular file or block device")
        if spec.length is not None:
            size = spec.length
        elif spec.path is not None and st.st_size > spec.offset:
            size = st.st_size - spec.offset
        else:
            size = UNBOUNDED
        readonly = spec.readonly
        if not readonly and spec.fd is not None:
            readonly = (fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE) == os.O_RDONLY
    except BaseException:
        if owned:
            os.close(fd)
        raise
    return (
        FileHandle(fd, spec.offset, owned, str(spec.path) if spec.path is not None else None),
        size,
        readonly,
    )
