"""The vocabulary weft's wire, etcd records, CRD and code share, declared once.

Every enum here is a `StrEnum` whose values are the strings already on the wire, in etcd and
in the CRD, so a record written before these enums existed reads the same, an enum member
compares equal to its string, and JSON carries the plain value. It sits in the bottom layer
so that boundary models (`weft.api`), the fabric, the planner and the operator use the same
classes instead of re-declaring them as `Literal`s.
"""

from __future__ import annotations

import enum


class MemoryKind(enum.StrEnum):
    """Where the bytes of a region live."""

    DRAM = "DRAM"
    VRAM = "VRAM"
    FILE = "FILE"
    OBJ = "OBJ"


class Op(enum.StrEnum):
    """Direction of a transfer, seen from the initiator."""

    WRITE = "WRITE"  # local -> remote
    READ = "READ"  # remote -> local

    @classmethod
    def parse(cls, value: Op | str) -> Op:
        """`Op` from an `Op` or its name in any case (``"read"``, ``"WRITE"``).

        Raises:
            ValueError: `value` names no operation.
        """
        if isinstance(value, Op):
            return value
        try:
            return cls(value.upper())
        except (ValueError, AttributeError):
            raise ValueError(f"unknown operation {value!r}: use Op.READ or Op.WRITE") from None


class TransferState(enum.StrEnum):
    """Life of a transfer: POSTED until it ends DONE or ERROR."""

    POSTED = "POSTED"
    DONE = "DONE"
    ERROR = "ERROR"


class Backend(enum.StrEnum):
    """Data-path backends a transfer can take (fabric metadata, member capabilities, CRD)."""

    LOCAL = "local"  # same host: process_vm_readv/writev (cross-memory attach)
    TCP = "tcp"  # sockets, zero-copy recv_into; the GPU-less and cross-host fallback
    UCX = "ucx"  # ucxx, optional extra


class StorageBackend(enum.StrEnum):
    """Storage tiers by NIXL's backend names (LMCache's ``nixl_backend``, the CRD's storage)."""

    POSIX = "POSIX"
    GDS = "GDS"
    GDS_MT = "GDS_MT"
    OBJ = "OBJ"
    HF3FS = "HF3FS"


class BufferDevice(enum.StrEnum):
    """Where staging buffers live (LMCache's ``nixl_buffer_device``, the CRD's fabric)."""

    CPU = "cpu"
    CUDA = "cuda"


class Role(enum.StrEnum):
    """A member's serving role in disaggregated inference."""

    PREFILL = "prefill"
    DECODE = "decode"


ROLES: tuple[Role, Role] = (Role.PREFILL, Role.DECODE)
"""Both roles, prefill first (the order plans, counts and status use)."""


class RolePolicy(enum.StrEnum):
    """How the planner splits members between the roles."""

    RATIO = "ratio"  # a fixed prefill:decode ratio with minimum counts
    LOAD = "load"  # steps driven by the members' load records


DEFAULT_RATIO = "1:1"
"""The ratio policy's ``prefill:decode`` when none is given (the CRD's and the agent's default)."""
DEFAULT_MIN_PREFILL = 1
"""Members kept in prefill whatever the ratio, when none is given."""
DEFAULT_MIN_DECODE = 1
"""Members kept in decode whatever the ratio, when none is given."""


class MemberState(enum.StrEnum):
    """A member's life in the group, as its member record says."""

    JOINING = "joining"  # registered, not yet serving
    ACTIVE = "active"  # serving and counted by the planner
    DRAINING = "draining"  # finishing in-flight work, planned out, then leaving


class EventKind(enum.StrEnum):
    """What a membership event reports (an agent's `/status` lists them by these names)."""

    ADDED = "added"
    UPDATED = "updated"
    REMOVED = "removed"
    LEADER = "leader"
    FENCED = "fenced"
    REJOINED = "rejoined"
    LEFT = "left"
    ETCD_LOST = "etcd-lost"
    ETCD_BACK = "etcd-back"
    LOAD = "load"
    PLAN = "plan"
    DRAIN = "drain"


class EngineMode(enum.StrEnum):
    """How an inference engine's pod runs weft (a TransferGroup's ``spec.engine.mode``)."""

    EMBEDDED = "embedded"  # the engine imports weft: no extra process
    SIDECAR = "sidecar"  # `weft agent` runs as a second container, for engines that do not
