"""weft.testing: a public kit of real servers for users' tests and for weft's own.

weft's control plane is only worth testing against the real thing: etcd's leases, watches,
auth and TLS, and a kube-apiserver's validation, owner references and garbage collection,
behave in ways a fake would get wrong. This package starts them as child processes on
loopback (`EtcdServer`, `ControlPlane`), much as `kopf.testing` hands an operator's tests a
running operator. It is a kit, not a runtime dependency: no module of the runtime imports
it (`.importlinter` keeps it so), and importing it starts nothing and loads neither
submodule until one of its names is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weft.testing.controlplane import ControlPlane
    from weft.testing.etcd import (
        EtcdctlError,
        EtcdServer,
        EtcdStartError,
        EtcdTLS,
        find_etcd_binary,
        find_etcdctl_binary,
        free_loopback_ports,
    )

__all__ = [
    "ControlPlane",
    "EtcdServer",
    "EtcdStartError",
    "EtcdTLS",
    "EtcdctlError",
    "find_etcd_binary",
    "find_etcdctl_binary",
    "free_loopback_ports",
]

# public name -> the submodule that defines it; loaded on first access (PEP 562)
_SOURCES = {
    "ControlPlane": "weft.testing.controlplane",
    "EtcdServer": "weft.testing.etcd",
    "EtcdStartError": "weft.testing.etcd",
    "EtcdTLS": "weft.testing.etcd",
    "EtcdctlError": "weft.testing.etcd",
    "find_etcd_binary": "weft.testing.etcd",
    "find_etcdctl_binary": "weft.testing.etcd",
    "free_loopback_ports": "weft.testing.etcd",
}


def __getattr__(name: str) -> Any:
    """Load the submodule that defines `name` and return the name from it.

    Args:
        name: one of `__all__`.

    Returns:
        The object, also cached in this module so that the next access is a plain lookup.

    Raises:
        AttributeError: `name` is not part of the kit.
    """
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
