"""What membership needs from the data path, as a `Protocol`.

Membership drives a fabric agent (adds and removes peers, fences it, pings and connects) but
does not care how the agent is built: `weft.fabric.agent.Agent` satisfies `FabricPort`, and a
test may pass anything else that does. Keeping the seam this small lets the fabric change
inside without membership noticing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from weft.api.vocab import Backend
from weft.fabric import errors as fabric_errors

PeerLostHook = Callable[[str, int, fabric_errors.WeftError], None]
"""``hook(name, generation, error)``: the data path lost a peer (called on a fabric thread)."""


class FabricPort(Protocol):
    """The fabric agent as membership uses it."""

    @property
    def name(self) -> str: ...

    @property
    def generation(self) -> int: ...

    @property
    def fenced(self) -> bool: ...

    @property
    def gpus(self) -> int: ...

    @property
    def backends(self) -> Sequence[Backend]: ...

    def metadata(self) -> bytes:
        """The agent's endpoint metadata, published in the member record."""
        ...

    def add_peer(self, metadata: bytes) -> str:
        """Add (or update) a peer from its metadata; returns its name."""
        ...

    def remove_peer(self, name: str) -> None: ...

    def peer_alive(self, name: str) -> bool: ...

    def connect(self, name: str) -> None:
        """Open the connection to a peer now (blocking: run it in a thread)."""
        ...

    def ping(self, name: str, on_pong: Callable[[float], None]) -> Callable[[], None]: ...

    def in_flight(self) -> int: ...

    def stats(self) -> dict[str, int]:
        """The agent's counters (the member's metrics show them next to membership's)."""
        ...

    def serve_until(self, deadline: float | None) -> None: ...

    def fence(self, reason: str) -> None: ...

    def unfence(self) -> None: ...

    def regenerate(self, generation: int) -> None: ...

    def on_peer_lost(self, hook: PeerLostHook) -> None: ...
