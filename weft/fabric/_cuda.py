"""The only module that touches CuPy: GPU detection and device/host copies.

CuPy imports fine on a machine without a GPU and `cupy.cuda.is_available()` says False, but
allocating raises `CUDARuntimeError`. Detection therefore runs once, lazily, on first need,
never at import time (CUDA must start after any fork).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from weft.fabric import errors

log = logging.getLogger(__name__)


@functools.cache
def _probe() -> tuple[bool, str]:
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising anything
        return False, f"cupy is not installed ({exc.__class__.__name__}: {exc})"
    try:
        if not cupy.cuda.is_available():
            return False, "cupy found no CUDA device"
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:
        return False, f"CUDA is not usable: {exc}"
    if count < 1:
        return False, "no CUDA device"
    return True, f"{count} CUDA device(s)"


def gpu_available() -> bool:
    """True when CuPy is installed and at least one CUDA device can be used."""
    return _probe()[0]


@functools.cache
def gpu_count() -> int:
    """CUDA devices CuPy can use (0 without CuPy or a GPU)."""
    if not _probe()[0]:
        return 0
    import cupy

    return int(cupy.cuda.runtime.getDeviceCount())


def require_gpu(what: str) -> None:
    """Raise `DeviceUnavailableError` naming `what` when no GPU can be used."""
    ok, why = _probe()
    if not ok:
        raise errors.DeviceUnavailableError(
            f"{what} needs GPU memory (VRAM), but {why}; use host memory (DRAM) instead"
        )


def device_of(obj: Any) -> int:
    """The CUDA device id of an object with `__cuda_array_interface__` (0 if unknown)."""
    try:
        import cupy

        return int(cupy.cuda.runtime.pointerGetAttributes(cuda_pointer(obj)).device)
    except Exception:
        return 0


def cuda_pointer(obj: Any) -> int:
    """The device address of an object with `__cuda_array_interface__`."""
    iface = obj.__cuda_array_interface__
    return int(iface["data"][0])


def alloc(nbytes: int) -> Any:
    """A device array of `nbytes` bytes (uint8)."""
    require_gpu("alloc(kind=VRAM)")
    import cupy

    return cupy.zeros(nbytes, dtype=cupy.uint8)


def device_to_host(src_ptr: int, dst: memoryview) -> None:
    """Copy len(dst) bytes from device address `src_ptr` into host memory `dst`."""
    import ctypes

    import cupy

    host = ctypes.addressof(ctypes.c_char.from_buffer(dst))
    cupy.cuda.runtime.memcpy(host, src_ptr, len(dst), cupy.cuda.runtime.memcpyDeviceToHost)


def host_to_device(src: memoryview, dst_ptr: int) -> None:
    """Copy host bytes `src` to device address `dst_ptr`."""
    import cupy
    import numpy as np

    host = int(np.frombuffer(src, dtype=np.uint8).ctypes.data)
    cupy.cuda.runtime.memcpy(dst_ptr, host, len(src), cupy.cuda.runtime.memcpyHostToDevice)
