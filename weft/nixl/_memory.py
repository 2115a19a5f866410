"""The memory half of ``nixl_agent``: backends, registrations, descriptor lists.

NIXL addresses memory by absolute (addr, len, devId) descriptors; weft by (region, offset).
`_Table` keeps this agent's registrations (and, in `weft.nixl._metadata`, each peer's
regions) as sorted intervals so that any NIXL descriptor maps to a weft region and offset.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import struct
import threading
from typing import Any

import numpy as np

from weft import fabric
from weft.fabric import Agent
from weft.nixl import _bindings as nixlBind
from weft.nixl import _convert

logger = logging.getLogger("weft.nixl._api")

#: The reach of a storage region registered with length 0 (to the end of its file or object).
UNBOUNDED = 1 << 62
_MEM_TYPES = {
    "UCX": ["DRAM_SEG", "VRAM_SEG"],
    "POSIX": ["DRAM_SEG", "FILE_SEG"],
    "OBJ": ["DRAM_SEG", "OBJ_SEG"],
}
_PLUGIN_PARAMS: dict[str, dict[str, str]] = {
    "UCX": {},
    "POSIX": {},
    "OBJ": {
        "bucket": "",
        "endpoint_override": "",
        "access_key": "",
        "secret_key": "",
        "region": "",
        "scheme": "http",
    },
}

_MEM = {
    "DRAM": nixlBind.DRAM_SEG,
    "VRAM": nixlBind.VRAM_SEG,
    "FILE": nixlBind.FILE_SEG,
    "BLOCK": nixlBind.BLK_SEG,
    "OBJ": nixlBind.OBJ_SEG,
    "cpu": nixlBind.DRAM_SEG,
    "cuda": nixlBind.VRAM_SEG,
}
_KIND = {
    nixlBind.DRAM_SEG: fabric.MemoryKind.DRAM,
    nixlBind.VRAM_SEG: fabric.MemoryKind.VRAM,
    nixlBind.FILE_SEG: fabric.MemoryKind.FILE,
    nixlBind.OBJ_SEG: fabric.MemoryKind.OBJ,
}
_SEG = {v: k for k, v in _KIND.items()}


class _CudaSpan:
    """Device memory at an address, as weft's `register` accepts it (duck-typed VRAM)."""

    def __init__(self, addr: int, size: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (size,),
            "typestr": "|u1",
            "data": (addr, False),
            "strides": None,
            "version": 3,
        }


class _Table:
    """Regions by (kind, device) as sorted intervals: address -> (region, offset)."""

    def __init__(self) -> None:
        self._spans: dict[tuple[nixlBind.nixl_mem_t, int], tuple[list[int], list[tuple[int, int, Any]]]] = {}

    @staticmethod
    def _key(seg: nixlBind.nixl_mem_t, dev: int) -> tuple[nixlBind.nixl_mem_t, int]:
        return (seg, 0 if seg is nixlBind.DRAM_SEG else dev)

    def add(self, seg: nixlBind.nixl_mem_t, dev: int, addr: int, size: int, region: Any) -> None:
        starts, items = self._spans.setdefault(self._key(seg, dev), ([], []))
        i = bisect.bisect_right(starts, addr)
        starts.insert(i, addr)
        items.insert(i, (addr, size, region))

    def remove(self, seg: nixlBind.nixl_mem_t, dev: int, addr: int, size: int) -> Any | None:
        starts, items = self._spans.get(self._key(seg, dev), ([], []))
        for i in range(bisect.bisect_left(starts, addr), len(starts)):
            if starts[i] != addr:
                break
            if items[i][1] == size:
                del starts[i]
                return items.pop(i)[2]
        return None

    def find(self, seg: nixlBind.nixl_mem_t, dev: int, addr: int, length: int) -> tuple[Any, int] | None:
        starts, items = self._spans.get(self._key(seg, dev), ([], []))
        i = bisect.bisect_right(starts, addr) - 1
        while i >= 0:
            start, size, region = items[i]
            if addr + length <= start + (size or UNBOUNDED):  # size 0: a file or object to its end
                return region, addr - start
            i -= 1  # overlapping registrations: an earlier, larger one may hold it
        return None

    def regions(self) -> list[Any]:
        return [r for _, items in self._spans.values() for _, _, r in items]


class Memory:
    """Plugins, backends, memory registration and descriptor lists of a ``nixl_agent``."""

    agent: Agent
    name: str
    backends: dict[str, Any]
    backend_mems: dict[str, list[str]]
    backend_options: dict[str, dict[str, str]]
    plugin_list: list[str]
    nixl_mems: dict[str, nixlBind.nixl_mem_t]
    _local: _Table
    _regs: list[tuple[nixlBind.nixl_mem_t, int, int, int, Any]]
    _lock: threading.RLock
    _shim: Any

    # -- plugins and backends ---------------------------------------------------------------
    def get_plugin_list(self) -> list[str]:
        """NIXL plugin names this shim offers (weft's own names are accepted too)."""
        return self.plugin_list

    def get_plugin_mem_types(self, backend: str) -> list[str]:
        if backend not in _MEM_TYPES:
            logger.warning("Plugin %s is not available to get its supported mem types.", backend)
            return []
        return list(_MEM_TYPES[backend])

    def get_plugin_params(self, backend: str) -> dict[str, str]:
        if backend not in _PLUGIN_PARAMS:
            logger.warning("Plugin %s is not available to get its parameters.", backend)
            return {}
        return dict(_PLUGIN_PARAMS[backend])

    def get_backend_mem_types(self, backend: str) -> list[str]:
        if backend in self.backend_mems:
            return self.backend_mems[backend]
        logger.warning("Backend %s not instantiated to get its supported mem types.", backend)
        return []

    def get_backend_params(self, backend: str) -> dict[str, str]:
        if backend in self.backend_options:
            return self.backend_options[backend]
        logger.warning("Backend %s not instantiated to get its parameters.", backend)
        return {}

    def create_backend(self, backend: str, initParams: dict[str, str] = {}) -> None:  # noqa: B006
        """Start a backend: "UCX" (weft's DRAM paths, always on), weft's "local"/"tcp"/"ucx",
        "POSIX" (files) or "OBJ" (S3 API; NIXL's OBJ parameters).

        Raises:
            nixlNotFoundError: an unknown plugin. nixlNotSupportedError: storage backends on a
            fabric without them. nixlBackendError: the backend failed to start.
        """
        if backend in self.backends:
            return
        if backend in ("POSIX", "OBJ"):
            try:
                self.agent.add_backend(backend, dict(initParams))
            except fabric.WeftError as exc:
                raise _convert.nixl_error(exc) from exc
        elif backend != "UCX" and backend.lower() not in {"local", "tcp", "ucx"}:
            raise nixlBind.nixlNotFoundError(f"createBackend: unsupported backend {backend!r}")
        self.backends[backend] = self._shim.next_id()
        self.backend_mems[backend] = list(_MEM_TYPES.get(backend, ["DRAM_SEG"]))
        self.backend_options[backend] = {**_PLUGIN_PARAMS.get(backend, {}), **initParams}
        logger.info("Backend %s was instantiated", backend)

    # -- memory -----------------------------------------------------------------------------
    def register_memory(
        self,
        reg_list: Any,
        mem_type: str | None = None,
        backends: list[str] = [],  # noqa: B006
    ) -> nixlBind.nixlRegDList:
        """Register descriptors (tuples, Nx3 array, tensors, nixlRegDList) with weft, one weft
        registration per descriptor.

        Raises:
            nixlInvalidParamError: input NIXL cannot read, or weft refuses the memory.
        """
        reg_descs = self.get_reg_descs(reg_list, mem_type)
        if reg_descs is None:
            raise nixlBind.nixlInvalidParamError("registerMem: cannot read the descriptor list")
        seg = reg_descs.getType()
        done: list[tuple[nixlBind.nixl_mem_t, int, int, int]] = []
        try:
            for addr, size, dev, meta in reg_descs.descs():
                reg = self._register_one(seg, addr, size, dev, meta)
                with self._lock:
                    self._local.add(seg, dev, addr, size, reg)
                    self._regs.append((seg, dev, addr, size, reg))
                done.append((seg, dev, addr, size))
        except fabric.WeftError as exc:
            for d in done:
                self._deregister_one(*d)
            raise _convert.nixl_error(exc) from exc
        return reg_descs

    def _register_one(self, seg: nixlBind.nixl_mem_t, addr: int, size: int, dev: int, meta: bytes) -> Any:
        if seg in (nixlBind.FILE_SEG, nixlBind.OBJ_SEG):
            return self._register_storage(seg, addr, size, dev, meta)
        if size <= 0:
            raise fabric.InvalidBufferError("cannot register an empty region")
        if seg is nixlBind.DRAM_SEG:
            return self.agent.register((ctypes.c_char * size).from_address(addr))
        if seg is nixlBind.VRAM_SEG:
            return self.agent.register(_CudaSpan(addr, size), kind=fabric.MemoryKind.VRAM)
        raise nixlBind.nixlNotSupportedError(f"{seg.name} memory is not supported by weft")

    def _register_storage(self, seg: nixlBind.nixl_mem_t, addr: int, size: int, dev: int, meta: bytes) -> Any:
        # NIXL: a FILE descriptor is (file offset, length, fd); an OBJ one (offset, length,
        # devId, key in metaInfo). Length 0 registers the file or object to its end.
        if seg is nixlBind.FILE_SEG:
            return self.agent.register(fabric.FileRegion(fd=dev, offset=addr, length=size or None))
        key = meta.decode() if meta else str(dev)
        return self.agent.register(fabric.ObjectRegion(key=key, size=addr + size if size else None))

    def deregister_memory(
        self,
        dereg_list: nixlBind.nixlRegDList,
        backends: list[str] = [],  # noqa: B006
    ) -> None:
        """Release the weft registrations of these descriptors.

        Raises:
            nixlNotFoundError: a descriptor that was not registered (the others are released).
        """
        seg = dereg_list.getType()
        missing = [d for d in dereg_list.descs() if not self._deregister_one(seg, d[2], d[0], d[1])]
        if missing:
            raise nixlBind.nixlNotFoundError(f"deregisterMem: not registered: {missing[0][:3]}")

    def _deregister_one(self, seg: nixlBind.nixl_mem_t, dev: int, addr: int, size: int) -> bool:
        with self._lock:
            reg = self._local.remove(seg, dev, addr, size)
            if reg is None:
                return False
            self._regs = [r for r in self._regs if r[4] is not reg]
        reg.release()
        return True

    def query_memory(
        self, reg_list: Any, backend: str, mem_type: str | None = None
    ) -> list[dict[str, str] | None]:
        """Which of these files/objects exist: None, or {"size": ...} (weft's `Agent.query`).

        Raises:
            ValueError: an unknown backend (as NIXL). nixlNotSupportedError: no storage.
        """
        reg_descs = self.get_reg_descs(reg_list, mem_type)
        if backend not in self.backends:
            raise ValueError(
                f"Backend '{backend}' not found. Available backends: {list(self.backends.keys())}"
            )
        if reg_descs is None:
            raise nixlBind.nixlInvalidParamError("queryMem: cannot read the descriptor list")
        seg = reg_descs.getType()
        try:
            asks: list[fabric.FileRegion | fabric.ObjectRegion] = [
                fabric.FileRegion(path=d[3].decode())
                if seg is nixlBind.FILE_SEG
                else fabric.ObjectRegion(key=d[3].decode())
                for d in reg_descs.descs()
            ]
            found = self.agent.query(asks)
        except fabric.WeftError as exc:
            raise _convert.nixl_error(exc) from exc
        return [None if f is None else {"size": str(f.size)} for f in found]

    # -- descriptor lists -------------------------------------------------------------------
    @staticmethod
    def _tensor_mem_type(tensor: Any) -> str:
        return "VRAM" if getattr(tensor, "is_cuda", False) else "DRAM"

    def get_xfer_descs(self, descs: Any, mem_type: str | None = None) -> nixlBind.nixlXferDList | None:
        """A nixlXferDList from 3-tuples + mem_type, an Nx3 array + mem_type, a tensor, a list
        of tensors, or a nixlXferDList. As NIXL (its tests assert it), bad input is logged
        and None is returned instead of raising."""
        out: nixlBind.nixlXferDList | None = self._dlist(descs, mem_type, nixlBind.nixlXferDList, 3)
        return out

    def get_reg_descs(self, descs: Any, mem_type: str | None = None) -> nixlBind.nixlRegDList | None:
        """A nixlRegDList from 4-tuples + mem_type, an Nx3 array + mem_type, a tensor, a list
        of tensors, or a nixlRegDList; None (logged) on bad input, as NIXL."""
        out: nixlBind.nixlRegDList | None = self._dlist(descs, mem_type, nixlBind.nixlRegDList, 4)
        return out

    def _dlist(self, descs: Any, mem_type: str | None, cls: type[nixlBind._DList], width: int) -> Any:
        other = nixlBind.nixlRegDList if cls is nixlBind.nixlXferDList else nixlBind.nixlXferDList
        try:
            if isinstance(descs, cls):
                return descs
            if isinstance(descs, other):
                logger.error("%s type detected, please use %s", type(descs).__name__, cls.__name__)
                return None
            if isinstance(descs, np.ndarray):
                if mem_type is None:
                    logger.error("Please specify a mem type if not using Tensors")
                    return None
                if descs.ndim != 2 or descs.shape[1] != 3:
                    logger.error("Nx3 shape required for transfer descriptor list from numpy array")
                    return None
                return cls(self.nixl_mems[mem_type], descs)
            if _convert.is_tensor(descs):
                d = _convert.tensor_desc(descs)
                if d is None:
                    logger.error("Please use a list of contiguous Tensors")
                    return None
                seg = nixlBind.VRAM_SEG if d[3] else nixlBind.DRAM_SEG
                return cls(seg, [(*d[:3], "")] if width == 4 else [d[:3]])
            if len(descs) and isinstance(descs[0], tuple):
                if mem_type is None:
                    logger.error("Please specify a mem type if not using Tensors")
                    return None
                if len(descs[0]) != width:
                    logger.error("%d-tuple list needed", width)
                    return None
                return cls(self.nixl_mems[mem_type], list(descs))
            if len(descs) and _convert.is_tensor(descs[0]):
                got = _convert.tensors_array(descs)
                if got is None:
                    logger.error("Please use a list of contiguous Tensors on one device kind")
                    return None
                return cls(nixlBind.VRAM_SEG if got[1] else nixlBind.DRAM_SEG, got[0])
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            logger.error("cannot read the descriptor list: %s", exc)
            return None
        return None

    def get_remote_descs(self, descs: Any, mem_type: str | None = None) -> nixlBind.nixlRemoteDList | None:
        """A nixlRemoteDList from (addr, len, devId, agent) 4-tuples; None on bad input."""
        if isinstance(descs, nixlBind.nixlRemoteDList):
            return descs
        if descs and isinstance(descs[0], tuple) and mem_type is not None and len(descs[0]) == 4:
            return nixlBind.nixlRemoteDList(self.nixl_mems[mem_type], list(descs))
        logger.error("4-tuple list (addr, len, dev_id, agent_name) and a mem type needed")
        return None

    def get_serialized_descs(self, descs: Any) -> bytes:
        """Descriptor list -> bytes for a peer's ``deserialize_descs``. NIXL pickles; weft does
        not (unpickling a peer's bytes runs its code): a fixed binary layout instead."""
        if not isinstance(descs, nixlBind._DList):
            raise nixlBind.nixlInvalidParamError("only NIXL descriptor lists can be serialized")
        kinds = {nixlBind.nixlXferDList: 0, nixlBind.nixlRegDList: 1, nixlBind.nixlRemoteDList: 2}
        out = [b"WNXD", struct.pack("!BBI", kinds[type(descs)], int(descs.getType()), descs.descCount())]
        for d in descs.descs():
            extra = b"" if len(d) == 3 else (d[3] if isinstance(d[3], bytes) else str(d[3]).encode())
            out.append(struct.pack("!QQQI", d[0], d[1], d[2], len(extra)) + extra)
        return b"".join(out)

    def deserialize_descs(self, serialized_descs: bytes) -> Any:
        """Bytes from `get_serialized_descs` -> the descriptor list.

        Raises:
            nixlMismatchError: bytes that are not a serialized list.
        """
        data = memoryview(serialized_descs)
        try:
            if bytes(data[:4]) != b"WNXD":
                raise ValueError("not a weft.nixl descriptor list")
            kind, seg, count = struct.unpack_from("!BBI", data, 4)
            cls = (nixlBind.nixlXferDList, nixlBind.nixlRegDList, nixlBind.nixlRemoteDList)[kind]
            pos, descs = 10, list[tuple[Any, ...]]()
            for _ in range(count):
                addr, size, dev, n = struct.unpack_from("!QQQI", data, pos)
                pos += 28
                extra = bytes(data[pos : pos + n])
                pos += n
                if cls is nixlBind.nixlXferDList:
                    descs.append((addr, size, dev))
                else:
                    descs.append((addr, size, dev, extra if cls is nixlBind.nixlRegDList else extra.decode()))
            if pos != len(data):
                raise ValueError("trailing bytes")
            return cls(nixlBind.nixl_mem_t(seg), descs)
        except (ValueError, IndexError, struct.error, UnicodeDecodeError) as exc:
            raise nixlBind.nixlMismatchError(f"cannot deserialize descriptors: {exc}") from exc
