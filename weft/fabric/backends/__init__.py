"""Data-path backends, registered by kind: one module per backend, one line below each.

The interface a backend implements (`weft.fabric.backend.DataPath`) and the agent services it
may use (`weft.fabric.backend.BackendHost`) are in `weft.fabric.backend`. A backend module
is imported only when an agent configured with its kind starts (`load_backend`), so a
missing optional library (ucxx) costs nothing until then.

Adding a backend: write its module here (or in any package), add a loader function and
one `register_backend` line at the bottom of this file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from weft.api.vocab import StorageBackend
from weft.fabric import errors
from weft.fabric.backend import BackendHost, DataPath, Factory, StorageFactory, StoragePath
from weft.fabric.types import Backend

__all__ = [
    "DataPath",
    "Factory",
    "StorageFactory",
    "StoragePath",
    "load_backend",
    "load_backends",
    "load_storage",
    "register_backend",
    "register_storage",
]

log = logging.getLogger(__name__)

_FACTORIES: dict[Backend, Callable[[], Factory]] = {}
_STORAGE: dict[StorageBackend, Callable[[], StorageFactory]] = {}

#: Storage backends NIXL has that this weft refuses, and why.
_REFUSED = {
    StorageBackend.GDS: "GPUDirect Storage needs cuFile (kvikio) and a GPU; neither is in this weft",
    StorageBackend.GDS_MT: "GPUDirect Storage needs cuFile (kvikio) and a GPU; neither is in this weft",
    StorageBackend.HF3FS: "3FS needs its client library (hf3fs_usrbio), which is not in this weft",
}


def register_backend(kind: Backend, loader: Callable[[], Factory]) -> None:
    """Make `kind` available to agents. `loader` is called lazily and may raise ImportError
    (or any error) when the backend's library is missing: the agent then logs why, once,
    and works without it."""
    _FACTORIES[kind] = loader


def load_backend(kind: Backend) -> Factory:
    """The factory registered for `kind` (imports its module now).

    Raises:
        ImportError (or what the loader raises): nothing registered, or its library is missing.
    """
    try:
        loader = _FACTORIES[kind]
    except KeyError:
        raise ImportError(f"no backend registered for {kind.value!r}") from None
    return loader()


def load_backends(kinds: Sequence[Backend], host: BackendHost) -> list[DataPath]:
    """Build the backends of `kinds` for one agent, in order; a missing one is logged and skipped.

    Raises:
        ConfigError: none of them is available.
    """
    loaded: list[DataPath] = []
    for kind in kinds:
        try:
            loaded.append(load_backend(kind)(host))
        except Exception as exc:  # a missing optional library must not stop the agent
            log.warning(
                "agent %s: backend %r unavailable (%s); continuing without it", host.name, kind.value, exc
            )
    if not loaded:
        raise errors.ConfigError(f"none of the backends {[b.value for b in kinds]} is available")
    return loaded


def register_storage(kind: StorageBackend, loader: Callable[[], StorageFactory]) -> None:
    """Make the storage backend `kind` available to `Agent.add_backend`."""
    _STORAGE[kind] = loader


def load_storage(kind: StorageBackend, host: BackendHost, params: Mapping[str, Any]) -> StoragePath:
    """Build the storage backend `kind` for one agent.

    Raises:
        BackendUnavailableError: refused here (GDS, GDS_MT, HF3FS: the reason is said) or its
            library is missing. ConfigError: bad parameters.
    """
    if kind in _REFUSED:
        raise errors.BackendUnavailableError(f"storage backend {kind.value} is refused: {_REFUSED[kind]}")
    try:
        factory = _STORAGE[kind]()
    except KeyError:
        raise errors.BackendUnavailableError(f"no storage backend registered for {kind.value!r}") from None
    except ImportError as exc:
        raise errors.BackendUnavailableError(f"storage backend {kind.value} is unavailable: {exc}") from None
    return factory(host, params)


def _tcp() -> Factory:
    from weft.fabric.backends import tcp

    return tcp.TcpBackend


def _local() -> Factory:
    from weft.fabric.backends import local

    return local.LocalBackend


def _ucx() -> Factory:
    from weft.fabric.backends import ucx

    ucx.load_ucxx()  # ImportError here when ucxx is missing: the agent goes on without ucx
    return ucx.UcxBackend


register_backend(Backend.TCP, _tcp)
register_backend(Backend.LOCAL, _local)
register_backend(Backend.UCX, _ucx)


def _posix() -> StorageFactory:
    from weft.fabric.backends import posix

    return posix.PosixBackend


def _obj() -> StorageFactory:
    from weft.fabric.backends import obj

    return obj.ObjBackend


register_storage(StorageBackend.POSIX, _posix)
register_storage(StorageBackend.OBJ, _obj)
