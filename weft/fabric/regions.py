"""An agent's registered regions: the table every request is checked against.

Readers (the serving threads of every backend) take the current dict without a lock: a
registration or release replaces the dict instead of changing it, so a request sees one
consistent table. A target resolves a request's descriptors here before any byte moves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from weft.fabric import errors
from weft.fabric.memory import DescList, Region, Registration
from weft.fabric.types import MemoryKind


class Span(NamedTuple):
    """One resolved descriptor of a request: where its bytes are in a local region."""

    region: Region
    offset: int
    length: int
    view: memoryview | None  # host regions: the bytes themselves


class Resolved(NamedTuple):
    """A request's descriptors checked: `spans`, or None with an `ErrorCode` and a message."""

    spans: list[Span] | None
    code: int
    message: str


class RegionTable:
    """The regions of one agent, by id and by name.

    Args:
        owner: the agent's name, for error messages.
        on_drop: called with a region's id after it is deregistered (peers are told).
    """

    def __init__(self, owner: str, on_drop: Callable[[int], None]) -> None:
        self.owner = owner
        self._on_drop = on_drop
        self._lock = threading.Lock()
        self._regions: dict[int, Region] = {}
        self._names: dict[str, int] = {}
        self._next = 1

    def snapshot(self) -> Mapping[int, Region]:
        """The current regions by id (never changed afterwards: safe without a lock)."""
        return self._regions

    def add(
        self,
        name: str | None,
        kind: MemoryKind,
        addr: int,
        size: int,
        readonly: bool,
        view: memoryview | None,
        device: int | None,
        keepalive: Any,
    ) -> Registration:
        """Register a normalised buffer. Raises RegistrationError on a duplicate name."""
        with self._lock:
            if name is not None and name in self._names:
                if view is not None:
                    view.release()
                raise errors.RegistrationError(f"a region named {name!r} is already registered")
            rid = self._next
            self._next += 1
            region = Region(rid, name, kind, addr, size, readonly, view, device, keepalive)
            self._regions = {**self._regions, rid: region}
            if name is not None:
                self._names[name] = rid
        return Registration(self, region)

    def deregister(self, region: Region) -> None:
        """Forget a region, tell peers, release its memory (deferred while a request holds it)."""
        with self._lock:
            regions = dict(self._regions)
            regions.pop(region.id, None)
            self._regions = regions
            if region.name is not None and self._names.get(region.name) == region.id:
                del self._names[region.name]
        self._on_drop(region.id)
        try:
            region.release()
        except BufferError:  # a transfer still holds a slice; the memory lives until it ends
            region.keepalive = None

    def local(self, descs: DescList) -> Region:
        """The region under descriptors of a registration of this table.

        Raises:
            InvalidDescriptorError: the descriptors belong to another agent or a peer.
            RegistrationError: the registration was released.
        """
        owner = descs.owner
        if not isinstance(owner, Registration) or owner.registry is not self:
            raise errors.InvalidDescriptorError(
                "local descriptors must come from a registration of this agent"
            )
        return owner.region

    def resolve(self, table: Any, write: bool, fenced: bool) -> Resolved:
        """Check every descriptor of a request (a `wire.DESC_DTYPE` table); take views of host ones.

        Views are taken here, so a region released while the request is served stays mapped
        until the views go (its release then defers); a region released before this point is
        simply unknown.
        """
        if fenced:
            return Resolved(
                None, errors.ErrorCode.FENCED, f"{self.owner!r} is fenced: it lost its group lease"
            )
        regions = self._regions
        spans: list[Span] = []
        for i, (rid, off, n) in enumerate(table.tolist()):
            region = regions.get(rid)
            if region is None:
                return Resolved(None, errors.ErrorCode.UNKNOWN_REGION, f"{self.owner!r} has no region #{rid}")
            if n == 0 or off + n > region.size:
                return Resolved(
                    None,
                    errors.ErrorCode.OUT_OF_BOUNDS,
                    f"descriptor {i} (offset {off}, length {n}) is outside region "
                    f"{region.label} of {region.size} bytes",
                )
            if region.kind in (MemoryKind.FILE, MemoryKind.OBJ):
                return Resolved(
                    None,
                    errors.ErrorCode.UNKNOWN_REGION,
                    f"region {region.label} of {self.owner!r} is {region.kind.value} storage, "
                    "which only its own agent moves",
                )
            if write and region.readonly:
                return Resolved(None, errors.ErrorCode.READ_ONLY, f"region {region.label} is read-only")
            view = None
            if region.kind is MemoryKind.DRAM:
                try:
                    view = region.view[off : off + n]
                except errors.RegistrationError:
                    return Resolved(
                        None, errors.ErrorCode.UNKNOWN_REGION, f"region #{rid} was just deregistered"
                    )
            spans.append(Span(region, off, n, view))
        return Resolved(spans, 0, "")
