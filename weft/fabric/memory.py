"""Registered memory and descriptor lists.

Anything with the buffer protocol (numpy, bytearray, mmap, ...) or `__cuda_array_interface__`
(cupy, torch.cuda) is normalised once, here, into a `Region`: a kind, a base address, a size
and, for host memory, a writable or read-only byte view. Descriptors are (offset, length)
pairs checked against a region's bounds when they are built, so a bad one fails at the
caller's line with `InvalidDescriptorError`, not later inside a backend.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from weft.fabric import _cuda, errors, storage
from weft.fabric.types import MemoryKind

U64Array = npt.NDArray[np.uint64]


class Region:
    """One registered memory area of this process (internal; users hold a `Registration`)."""

    __slots__ = ("_view", "addr", "device", "id", "keepalive", "kind", "name", "readonly", "size")

    def __init__(
        self,
        rid: int,
        name: str | None,
        kind: MemoryKind,
        addr: int,
        size: int,
        readonly: bool,
        view: memoryview | None,
        device: int | None = None,
        keepalive: Any = None,
    ) -> None:
        self.id = rid
        self.name = name
        self.kind = kind
        self.addr = addr
        self.size = size
        self.readonly = readonly
        self._view = view
        self.device = device
        self.keepalive = keepalive

    @property
    def view(self) -> memoryview:
        """The bytes of a host region (DRAM)."""
        if self._view is None:
            raise errors.RegistrationError(f"region {self.label} is not host memory")
        return self._view

    @property
    def label(self) -> str:
        return repr(self.name) if self.name is not None else f"#{self.id}"

    def release(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if isinstance(self.keepalive, storage.FileHandle):
            self.keepalive.release()  # closes the file once no transfer uses it
        self.keepalive = None


def normalise(
    obj: Any, kind: MemoryKind | None
) -> tuple[MemoryKind, int, int, bool, memoryview | None, int | None, Any]:
    """Turn a user object into (kind, addr, size, readonly, host view, device, keepalive).

    A `FileRegion` becomes a FILE region whose address is its offset in the file and whose
    keepalive is the open `storage.FileHandle`; an `ObjectRegion` an OBJ region at address 0
    whose keepalive is the spec itself.
    """
    if isinstance(obj, storage.FileRegion):
        if kind not in (None, MemoryKind.FILE):
            raise errors.InvalidBufferError(f"a FileRegion cannot be registered as {kind}")
        handle, size, readonly = storage.open_file(obj)
        return MemoryKind.FILE, obj.offset, size, readonly, None, None, handle
    if isinstance(obj, storage.ObjectRegion):
        if kind not in (None, MemoryKind.OBJ):
            raise errors.InvalidBufferError(f"an ObjectRegion cannot be registered as {kind}")
        size = obj.size if obj.size is not None else storage.UNBOUNDED
        return MemoryKind.OBJ, 0, size, obj.readonly, None, None, obj
    if hasattr(obj, "__cuda_array_interface__"):
        if kind not in (None, MemoryKind.VRAM):
            raise errors.InvalidBufferError(f"a CUDA array cannot be registered as {kind}")
        _cuda.require_gpu("registering a CUDA array")
        iface = obj.__cuda_array_interface__
        strides = iface.get("strides")
        shape = tuple(iface["shape"])
        itemsize = np.dtype(iface["typestr"]).itemsize
        size = int(np.prod(shape, dtype=np.int64)) * itemsize
        if strides is not None and tuple(strides) != _c_strides(shape, itemsize):
            raise errors.InvalidBufferError("CUDA array must be C-contiguous")
        if size <= 0:
            raise errors.InvalidBufferError("cannot register an empty buffer")
        ptr, readonly = iface["data"]
        return MemoryKind.VRAM, int(ptr), size, bool(readonly), None, _cuda.device_of(obj), obj
    if kind is MemoryKind.VRAM:
        _cuda.require_gpu("registering VRAM")
        raise errors.InvalidBufferError(
            f"{type(obj).__name__} is host memory; VRAM needs an object with "
            "__cuda_array_interface__ (cupy, torch.cuda)"
        )
    if kind in (MemoryKind.FILE, MemoryKind.OBJ):
        raise errors.InvalidBufferError(
            f"a {kind.value} region is registered as FileRegion(...) or ObjectRegion(...), "
            f"not as {type(obj).__name__}"
        )
    try:
        view = memoryview(obj)
    except TypeError:
        raise errors.InvalidBufferError(
            f"cannot register {type(obj).__name__}: it has neither the buffer protocol nor "
            "__cuda_array_interface__"
        ) from None
    if not view.c_contiguous:
        view.release()
        raise errors.InvalidBufferError("buffer must be C-contiguous (use numpy.ascontiguousarray)")
    if view.nbytes == 0:
        view.release()
        raise errors.InvalidBufferError("cannot register an empty buffer")
    flat = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    addr = int(np.frombuffer(flat, dtype=np.uint8).ctypes.data)
    return MemoryKind.DRAM, addr, flat.nbytes, flat.readonly, flat, None, obj


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides = []
    acc = itemsize
    for dim in reversed(shape):
        strides.append(acc)
        acc *= dim
    return tuple(reversed(strides))


def parse_pairs(
    pairs: Iterable[tuple[int, int]] | npt.ArrayLike, size: int, what: str
) -> tuple[U64Array, U64Array]:
    """Validate (offset, length) pairs against a region of `size` bytes."""
    try:
        arr = np.asarray(pairs if not isinstance(pairs, Iterable) or hasattr(pairs, "shape") else list(pairs))
    except (TypeError, ValueError) as exc:
        raise errors.InvalidDescriptorError(f"{what}: descriptors must be (offset, length) pairs") from exc
    if arr.size == 0:
        raise errors.InvalidDescriptorError(f"{what}: empty descriptor list")
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise errors.InvalidDescriptorError(
            f"{what}: descriptors must be (offset, length) pairs, got shape {arr.shape}"
        )
    if arr.dtype.kind not in "iu" and (arr.dtype.kind == "O" or not np.all(np.mod(arr, 1) == 0)):
        raise errors.InvalidDescriptorError(f"{what}: offsets and lengths must be integers")
    try:
        signed = arr.astype(np.int64, casting="unsafe") if arr.dtype.kind != "u" else None
    except (TypeError, ValueError, OverflowError) as exc:
        raise errors.InvalidDescriptorError(f"{what}: offsets and lengths must be integers") from exc
    if signed is not None:
        if np.any(signed[:, 0] < 0):
            i = int(np.argmax(signed[:, 0] < 0))
            raise errors.InvalidDescriptorError(f"{what}: descriptor {i} has a negative offset")
        if np.any(signed[:, 1] <= 0):
            i = int(np.argmax(signed[:, 1] <= 0))
            raise errors.InvalidDescriptorError(f"{what}: descriptor {i} has length <= 0")
        arr = signed
    elif np.any(arr[:, 1] == 0):
        i = int(np.argmax(arr[:, 1] == 0))
        raise errors.InvalidDescriptorError(f"{what}: descriptor {i} has length 0")
    if arr.dtype.kind == "u" and np.any(arr > np.uint64(1 << 62)):
        raise errors.InvalidDescriptorError(f"{what}: descriptor out of range")
    offsets = arr[:, 0].astype(np.uint64)
    lengths = arr[:, 1].astype(np.uint64)
    ends = offsets + lengths
    bad = ends > np.uint64(size)
    if np.any(bad):
        i = int(np.argmax(bad))
        raise errors.InvalidDescriptorError(
            f"{what}: descriptor {i} (offset {int(offsets[i])}, length {int(lengths[i])}) "
            f"ends past the region's {size} bytes"
        )
    return offsets, lengths


class DescList:
    """Descriptors into one region: (offset, length) pairs, already bounds-checked."""

    __slots__ = ("lengths", "offsets", "owner", "region_id", "region_name", "total")

    def __init__(self, owner: Registration | RemoteRegion, offsets: U64Array, lengths: U64Array) -> None:
        self.owner = owner
        self.region_id = owner.id
        self.region_name = owner.name
        self.offsets = offsets
        self.lengths = lengths
        self.total = int(lengths.sum())

    def __len__(self) -> int:
        return len(self.offsets)

    def __repr__(self) -> str:
        return f"DescList({self.owner!r}, n={len(self)}, bytes={self.total})"

    def pairs(self) -> list[tuple[int, int]]:
        return [(int(o), int(n)) for o, n in zip(self.offsets, self.lengths, strict=True)]


def _descs(
    owner: Registration | RemoteRegion, pairs: Iterable[tuple[int, int]] | npt.ArrayLike | None
) -> DescList:
    if pairs is None:
        pairs = [(0, owner.size)]
    label = repr(owner.name) if owner.name is not None else f"#{owner.id}"
    offsets, lengths = parse_pairs(pairs, owner.size, f"region {label}")
    return DescList(owner, offsets, lengths)


def _blocks(
    owner: Registration | RemoteRegion, block_bytes: int, indices: Sequence[int] | npt.ArrayLike
) -> DescList:
    if block_bytes <= 0:
        raise errors.InvalidDescriptorError("block_bytes must be > 0")
    try:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise errors.InvalidDescriptorError("block indices must be integers") from exc
    pairs = np.stack([idx * block_bytes, np.full_like(idx, block_bytes)], axis=1)
    return _descs(owner, pairs)


_DESCS_DOC = """Descriptors into this region; no argument means the whole region.

        Args:
            pairs: (offset, length) pairs, as a sequence or an (n, 2) integer array.
        Raises:
            InvalidDescriptorError: empty, negative, zero-length or out-of-bounds pairs.
        """

_BLOCKS_DOC = """Descriptors for fixed-size blocks by index (KV-cache pages): block i starts at
        i * block_bytes."""


class Registry(Protocol):
    """Where a registration goes back to when it is released (an agent's region table)."""

    def deregister(self, region: Region) -> None: ...


class Registration:
    """A handle on memory registered with an agent; `release()` (or `with`) deregisters it."""

    __slots__ = ("__weakref__", "_lock", "_region", "registry")

    def __init__(self, registry: Registry, region: Region) -> None:
        self.registry = registry
        self._region: Region | None = region
        self._lock = threading.Lock()

    @property
    def region(self) -> Region:
        r = self._region
        if r is None:
            raise errors.RegistrationError("registration was released")
        return r

    @property
    def id(self) -> int:
        return self.region.id

    @property
    def name(self) -> str | None:
        return self.region.name

    @property
    def kind(self) -> MemoryKind:
        return self.region.kind

    @property
    def size(self) -> int:
        return self.region.size

    @property
    def addr(self) -> int:
        return self.region.addr

    def descs(self, pairs: Iterable[tuple[int, int]] | npt.ArrayLike | None = None) -> DescList:
        return _descs(self, pairs)

    def blocks(self, block_bytes: int, indices: Sequence[int] | npt.ArrayLike) -> DescList:
        return _blocks(self, block_bytes, indices)

    descs.__doc__ = _DESCS_DOC
    blocks.__doc__ = _BLOCKS_DOC

    @property
    def buffer(self) -> Any:
        """The registered object itself (for `Agent.alloc`, a numpy uint8 array)."""
        return self.region.keepalive

    @property
    def released(self) -> bool:
        return self._region is None

    def release(self) -> None:
        """Deregister. Peers that still target this region get `UnknownRegionError`."""
        with self._lock:
            region, self._region = self._region, None
        if region is not None:
            self.registry.deregister(region)

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        r = self._region
        if r is None:
            return "Registration(released)"
        return f"Registration({r.label}, {r.kind.value}, {r.size} bytes)"


class RemoteRegion:
    """A region of a peer, as its metadata described it."""

    __slots__ = ("addr", "id", "instance", "kind", "name", "peer", "readonly", "size")

    def __init__(
        self,
        peer: str,
        instance: str,
        rid: int,
        name: str | None,
        kind: MemoryKind,
        size: int,
        addr: int,
        readonly: bool,
    ) -> None:
        self.peer = peer
        self.instance = instance
        self.id = rid
        self.name = name
        self.kind = kind
        self.size = size
        self.addr = addr
        self.readonly = readonly

    def descs(self, pairs: Iterable[tuple[int, int]] | npt.ArrayLike | None = None) -> DescList:
        return _descs(self, pairs)

    def blocks(self, block_bytes: int, indices: Sequence[int] | npt.ArrayLike) -> DescList:
        return _blocks(self, block_bytes, indices)

    descs.__doc__ = _DESCS_DOC
    blocks.__doc__ = _BLOCKS_DOC

    def __repr__(self) -> str:
        label = repr(self.name) if self.name is not None else f"#{self.id}"
        return f"RemoteRegion({self.peer}:{label}, {self.kind.value}, {self.size} bytes)"
