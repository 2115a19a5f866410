"""Data-path backends: plugins chosen per (local memory kind, remote memory kind, peer).

A backend turns a validated request into bytes moved. The agent asks each configured
backend, in the order of `AgentConfig.backends`, whether it can serve a request
(`usable`), lays the request out once (`plan`, reused by every post of a prepared
transfer) and posts it (`post`), which must end the transfer exactly once, from any thread.

Adding a backend: write a class with this shape in a module of this package (or any
package), and register a factory for its `Backend` member with `register_backend`. See
DEVELOPMENT.md, "Adding a backend".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from weft.fabric.types import Backend, MemoryKind, Op

if TYPE_CHECKING:
    from weft.fabric.agent import Agent, Peer
    from weft.fabric.memory import DescList
    from weft.fabric.transfer import Transfer


class DataPath(Protocol):
    kind: Backend

    def usable(self, peer: Peer, local: MemoryKind, remote: MemoryKind) -> bool:
        """Can this backend move bytes between these kinds for this peer right now?"""
        ...

    def plan(self, op: Op, local: DescList, peer: Peer, remote: DescList) -> Any:
        """Lay out a request once; the result is passed to every `post`."""
        ...

    def post(self, plan: Any, transfer: Transfer, notify: bytes | None) -> None:
        """Start moving bytes; finish `transfer` (DONE or error) exactly once."""
        ...

    def endpoint(self) -> str | None:
        """This backend's own address for peers (published in metadata), or None."""
        ...

    def close(self) -> None: ...


Factory = Callable[["Agent"], DataPath]
_FACTORIES: dict[Backend, Callable[[], Factory]] = {}


def register_backend(kind: Backend, loader: Callable[[], Factory]) -> None:
    """Make `kind` available to agents. `loader` is called lazily and may raise ImportError
    (or any error) when the backend's library is missing: the agent then logs why, once,
    and works without it."""
    _FACTORIES[kind] = loader


def load_backend(kind: Backend) -> Factory:
    try:
        loader = _FACTORIES[kind]
    except KeyError:
        raise ImportError(f"no backend registered for {kind.value!r}") from None
    return loader()


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
