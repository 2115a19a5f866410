"""weft's typed errors as NIXL's error classes, and NIXL's descriptor inputs as lists.

Every weft error a call can raise surfaces as the NIXL class a client catches (``except
nixlBackendError``), with weft's message and the weft error kept as ``__cause__``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from weft import fabric
from weft.nixl import _bindings as nb

_MAP: tuple[tuple[type[fabric.WeftError], type[nb.nixlError]], ...] = (
    (fabric.TransferCancelledError, nb.nixlCancelledError),
    (fabric.PeerLostError, nb.nixlRemoteDisconnectError),  # NIXL_ERR_REMOTE_DISCONNECT
    (fabric.TransferError, nb.nixlBackendError),
    (fabric.UnknownPeerError, nb.nixlNotFoundError),
    (fabric.UnknownRegionError, nb.nixlNotFoundError),
    (fabric.BackendUnavailableError, nb.nixlNotFoundError),  # NIXL: no backend can prepare
    (fabric.MetadataError, nb.nixlMismatchError),  # NIXL: metadata that does not deserialize
    (fabric.InvalidDescriptorError, nb.nixlInvalidParamError),
    (fabric.InvalidBufferError, nb.nixlInvalidParamError),
    (fabric.ConfigError, nb.nixlInvalidParamError),
    (fabric.AuthenticationError, nb.nixlNotAllowedError),
    (fabric.FencedError, nb.nixlNotAllowedError),
    (fabric.AgentClosedError, nb.nixlNotAllowedError),
    (fabric.RegistrationError, nb.nixlNotAllowedError),
    (fabric.DeviceUnavailableError, nb.nixlNotSupportedError),
    (fabric.StorageError, nb.nixlBackendError),
)


def nixl_error(exc: fabric.WeftError) -> nb.nixlError:
    """The NIXL error for a weft error (raise it ``from exc``)."""
    for weft_cls, nixl_cls in _MAP:
        if isinstance(exc, weft_cls):
            return nixl_cls(str(exc))
    return nb.nixlUnknownError(str(exc))


def is_tensor(obj: Any) -> bool:
    """A torch tensor, by duck typing (weft never imports torch)."""
    return hasattr(obj, "data_ptr") and hasattr(obj, "element_size") and hasattr(obj, "numel")


def tensor_desc(t: Any) -> tuple[int, int, int, bool] | None:
    """(addr, bytes, device, is_gpu) of a contiguous tensor; None if not contiguous."""
    contiguous = getattr(t, "is_contiguous", None)
    if contiguous is not None and not contiguous():
        return None
    gpu = bool(getattr(t, "is_cuda", False))
    dev = int(t.get_device()) if gpu and hasattr(t, "get_device") else 0
    return int(t.data_ptr()), int(t.numel()) * int(t.element_size()), max(dev, 0), gpu


def tensors_array(tensors: Any) -> tuple[np.ndarray[Any, Any], bool] | None:
    """An Nx3 array for a list of contiguous tensors on one device kind; None otherwise."""
    rows = []
    kinds = set()
    for t in tensors:
        d = tensor_desc(t)
        if d is None:
            return None
        rows.append(d[:3])
        kinds.add(d[3])
    if len(kinds) != 1:
        return None
    return np.asarray(rows, dtype=np.uint64).reshape(-1, 3), kinds.pop()


def text_bytes(msg: bytes | str) -> bytes:
    return msg.encode() if isinstance(msg, str) else bytes(msg)
