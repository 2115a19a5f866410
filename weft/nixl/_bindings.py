"""What NIXL's compiled ``nixl._bindings`` gives its clients, in pure Python.

Clients import names from here directly (``from nixl._api import nixlBind`` then
``nixlBind.nixlRegDList``, ``except nixlBind.nixlBackendError``), so the names, enum values,
descriptor-list methods and the error classes match NIXL 1.5. Behaviour that differs on
purpose:

- an index past the end of a list raises `IndexError` (NIXL's pybind list reads past its end);
- the error classes share a base, `nixlError`, and carry the weft message with the weft error
  as ``__cause__`` (NIXL's only say ``NIXL_ERR_...``);
- lists pickle (NIXL's do, and clients pickle them), but the agent's own
  ``get_serialized_descs`` does not use pickle (see `weft.nixl._api`).

The C++ agent classes (``nixlAgent``, ``nixlAgentConfig``) are not here: clients reach the
agent through ``nixl._api.nixl_agent`` only.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

DEFAULT_COMM_PORT = 8888
NIXL_INIT_AGENT = ""
HAVE_UCX_GPU_DEVICE_API = False


class _Enum(enum.IntEnum):
    """pybind11 enums print as ``Type.NAME``; IntEnum would print the number."""

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


class nixl_mem_t(_Enum):
    DRAM_SEG = 0
    VRAM_SEG = 1
    BLK_SEG = 2
    OBJ_SEG = 3
    FILE_SEG = 4


class nixl_status_t(_Enum):
    NIXL_IN_PROG = 1
    NIXL_SUCCESS = 0
    NIXL_ERR_NOT_POSTED = -1
    NIXL_ERR_INVALID_PARAM = -2
    NIXL_ERR_BACKEND = -3
    NIXL_ERR_NOT_FOUND = -4
    NIXL_ERR_MISMATCH = -5
    NIXL_ERR_NOT_ALLOWED = -6
    NIXL_ERR_REPOST_ACTIVE = -7
    NIXL_ERR_UNKNOWN = -8
    NIXL_ERR_NOT_SUPPORTED = -9


class nixl_xfer_op_t(_Enum):
    NIXL_READ = 0
    NIXL_WRITE = 1


class nixl_thread_sync_t(_Enum):
    NIXL_THREAD_SYNC_NONE = 0
    NIXL_THREAD_SYNC_STRICT = 1
    NIXL_THREAD_SYNC_RW = 2
    NIXL_THREAD_SYNC_DEFAULT = 0  # an alias of NONE, as in NIXL


class nixl_cost_t(_Enum):
    NIXL_COST_ANALYTICAL_BACKEND = 0


DRAM_SEG = nixl_mem_t.DRAM_SEG
VRAM_SEG = nixl_mem_t.VRAM_SEG
BLK_SEG = nixl_mem_t.BLK_SEG
OBJ_SEG = nixl_mem_t.OBJ_SEG
FILE_SEG = nixl_mem_t.FILE_SEG

NIXL_IN_PROG = nixl_status_t.NIXL_IN_PROG
NIXL_SUCCESS = nixl_status_t.NIXL_SUCCESS
NIXL_ERR_NOT_POSTED = nixl_status_t.NIXL_ERR_NOT_POSTED
NIXL_ERR_INVALID_PARAM = nixl_status_t.NIXL_ERR_INVALID_PARAM
NIXL_ERR_BACKEND = nixl_status_t.NIXL_ERR_BACKEND
NIXL_ERR_NOT_FOUND = nixl_status_t.NIXL_ERR_NOT_FOUND
NIXL_ERR_MISMATCH = nixl_status_t.NIXL_ERR_MISMATCH
NIXL_ERR_NOT_ALLOWED = nixl_status_t.NIXL_ERR_NOT_ALLOWED
NIXL_ERR_REPOST_ACTIVE = nixl_status_t.NIXL_ERR_REPOST_ACTIVE
NIXL_ERR_UNKNOWN = nixl_status_t.NIXL_ERR_UNKNOWN
NIXL_ERR_NOT_SUPPORTED = nixl_status_t.NIXL_ERR_NOT_SUPPORTED

NIXL_READ = nixl_xfer_op_t.NIXL_READ
NIXL_WRITE = nixl_xfer_op_t.NIXL_WRITE

NIXL_THREAD_SYNC_NONE = nixl_thread_sync_t.NIXL_THREAD_SYNC_NONE
NIXL_THREAD_SYNC_STRICT = nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
NIXL_THREAD_SYNC_RW = nixl_thread_sync_t.NIXL_THREAD_SYNC_RW
NIXL_THREAD_SYNC_DEFAULT = nixl_thread_sync_t.NIXL_THREAD_SYNC_DEFAULT

NIXL_COST_ANALYTICAL_BACKEND = nixl_cost_t.NIXL_COST_ANALYTICAL_BACKEND


# -- errors ------------------------------------------------------------------------------


class nixlError(Exception):
    """Base of the shim's NIXL errors (NIXL has none; its classes derive from Exception)."""

    status = NIXL_ERR_UNKNOWN


class nixlNotPostedError(nixlError):
    status = NIXL_ERR_NOT_POSTED


class nixlInvalidParamError(nixlError):
    status = NIXL_ERR_INVALID_PARAM


class nixlBackendError(nixlError):
    status = NIXL_ERR_BACKEND


class nixlNotFoundError(nixlError):
    status = NIXL_ERR_NOT_FOUND


class nixlMismatchError(nixlError):
    status = NIXL_ERR_MISMATCH


class nixlNotAllowedError(nixlError):
    status = NIXL_ERR_NOT_ALLOWED


class nixlRepostActiveError(nixlError):
    status = NIXL_ERR_REPOST_ACTIVE


class nixlUnknownError(nixlError):
    status = NIXL_ERR_UNKNOWN


class nixlNotSupportedError(nixlError):
    status = NIXL_ERR_NOT_SUPPORTED


class nixlCancelledError(nixlError):
    pass


class nixlNoTelemetryError(nixlError):
    pass


class nixlRemoteDisconnectError(nixlError):
    pass


# -- telemetry ---------------------------------------------------------------------------


class nixlXferTelemetry:
    """Times in microseconds: startTime (since the epoch), postDuration, xferDuration."""

    __slots__ = ("descCount", "postDuration", "startTime", "totalBytes", "xferDuration")

    def __init__(self) -> None:
        self.startTime = 0
        self.postDuration = 0
        self.xferDuration = 0
        self.totalBytes = 0
        self.descCount = 0

    def __repr__(self) -> str:
        return (
            f"nixlXferTelemetry(startTime={self.startTime}, postDuration={self.postDuration}, "
            f"xferDuration={self.xferDuration}, totalBytes={self.totalBytes}, descCount={self.descCount})"
        )


# -- descriptor lists --------------------------------------------------------------------

Desc = tuple[Any, ...]


class _DList:
    """A typed list of descriptor tuples; subclasses fix the tuple's shape."""

    _width = 3
    __slots__ = ("_arr", "_descs", "_type")

    def __init__(self, type: nixl_mem_t, descs: Any = 0) -> None:
        self._type = nixl_mem_t(type)
        self._arr: npt.NDArray[np.uint64] | None = None
        if isinstance(descs, int | np.integer) and not isinstance(descs, bool):
            self._descs: list[Desc] = [self._zero() for _ in range(int(descs))]
        elif isinstance(descs, np.ndarray):
            if descs.ndim != 2 or descs.shape[1] != 3:
                raise TypeError(f"descriptor array must be Nx3, got shape {descs.shape}")
            rows = descs.astype(np.uint64, copy=False).tolist()
            self._descs = [self._from_row(r) for r in rows]
        elif isinstance(descs, Iterable):
            self._descs = [self._check(d) for d in descs]
        else:
            raise TypeError(f"cannot build {self.__class__.__name__} from {descs!r}")

    def _zero(self) -> Desc:
        return (0, 0, 0)

    def _from_row(self, row: list[int]) -> Desc:
        return (int(row[0]), int(row[1]), int(row[2]))

    def _check(self, d: Any) -> Desc:
        if not isinstance(d, tuple) or len(d) != self._width:
            raise TypeError(f"{type(self).__name__} takes {self._width}-tuples, got {d!r}")
        return (int(d[0]), int(d[1]), int(d[2]), *d[3:])

    # NIXL's methods -------------------------------------------------------------------
    def descCount(self) -> int:
        return len(self._descs)

    def getType(self) -> nixl_mem_t:
        return self._type

    def isEmpty(self) -> bool:
        return not self._descs

    def clear(self) -> None:
        self._descs.clear()
        self._arr = None

    def addDesc(self, desc: tuple[Any, ...]) -> None:
        self._descs.append(self._check(desc))
        self._arr = None

    append = addDesc

    def remDesc(self, index: int) -> None:
        del self._descs[self._index(index)]
        self._arr = None

    def index(self, desc: tuple[Any, ...]) -> int:
        return self._descs.index(self._check(desc))

    def print(self) -> None:
        print(f"DescList of mem type {int(self._type)}")
        for d in self._descs:
            print(f"  {d}")

    def _index(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self._descs):
            raise IndexError(f"descriptor index {i} out of range (count {len(self._descs)})")
        return i

    def __getitem__(self, i: int) -> Desc:
        return self._descs[self._index(i)]

    def __setitem__(self, i: int, desc: tuple[Any, ...]) -> None:
        self._descs[self._index(i)] = self._check(desc)
        self._arr = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _DList) or type(other) is not type(self):
            return NotImplemented
        return self._type == other._type and self._descs == other._descs

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]  # mutable, like NIXL's

    def __getstate__(self) -> tuple[int, list[Desc]]:
        return int(self._type), list(self._descs)

    def __setstate__(self, state: tuple[int, list[Desc]]) -> None:
        self._type = nixl_mem_t(state[0])
        self._descs = [self._check(tuple(d)) for d in state[1]]
        self._arr = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._type.name} n={len(self._descs)}>"

    # for the shim ---------------------------------------------------------------------
    def descs(self) -> list[Desc]:
        """The tuples themselves (the shim's reader; not a NIXL method)."""
        return self._descs

    def array(self) -> npt.NDArray[np.uint64]:
        """(addr, len, dev) as an Nx3 uint64 array, cached until the list changes."""
        if self._arr is None:
            arr = np.zeros((len(self._descs), 3), dtype=np.uint64)
            for i, d in enumerate(self._descs):
                arr[i, 0], arr[i, 1], arr[i, 2] = d[0], d[1], d[2]
            self._arr = arr
        return self._arr


class nixlXferDList(_DList):
    """(addr, len, devId) descriptors of a transfer."""

    __slots__ = ()


class nixlRegDList(_DList):
    """(addr, len, devId, metaInfo) descriptors of a registration; metaInfo reads back as bytes."""

    _width = 4
    __slots__ = ()

    def _zero(self) -> Desc:
        return (0, 0, 0, b"")

    def _from_row(self, row: list[int]) -> Desc:
        return (int(row[0]), int(row[1]), int(row[2]), b"")

    def _check(self, d: Any) -> Desc:
        if not isinstance(d, tuple) or len(d) != 4:
            raise TypeError(f"nixlRegDList takes (addr, len, devId, metaInfo) tuples, got {d!r}")
        meta = d[3].encode() if isinstance(d[3], str) else bytes(d[3])
        return (int(d[0]), int(d[1]), int(d[2]), meta)

    def trim(self) -> nixlXferDList:
        """The same descriptors without their metaInfo."""
        return nixlXferDList(self._type, [d[:3] for d in self._descs])


class nixlRemoteDList(_DList):
    """(addr, len, devId, agent name) descriptors (NIXL's device-side memory views)."""

    _width = 4
    __slots__ = ()

    def _zero(self) -> Desc:
        return (0, 0, 0, "")

    def _check(self, d: Any) -> Desc:
        if not isinstance(d, tuple) or len(d) != 4:
            raise TypeError(f"nixlRemoteDList takes (addr, len, devId, agent) tuples, got {d!r}")
        name = d[3].decode() if isinstance(d[3], bytes) else str(d[3])
        return (int(d[0]), int(d[1]), int(d[2]), name)
