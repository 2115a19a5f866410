"""Enums and small value types shared by the fabric (enums, never strings)."""

from __future__ import annotations

import enum


class MemoryKind(enum.Enum):
    """Where the bytes of a region live."""

    DRAM = "DRAM"
    VRAM = "VRAM"
    FILE = "FILE"
    OBJ = "OBJ"


class Op(enum.Enum):
    """Direction of a transfer, seen from the initiator."""

    WRITE = "WRITE"  # local -> remote
    READ = "READ"  # remote -> local

    @classmethod
    def parse(cls, value: Op | str) -> Op:
        if isinstance(value, Op):
            return value
        try:
            return cls(value.upper())
        except (ValueError, AttributeError):
            raise ValueError(f"unknown operation {value!r}: use Op.READ or Op.WRITE") from None


class TransferState(enum.Enum):
    """Life of a transfer: POSTED until it ends DONE or ERROR."""

    POSTED = "POSTED"
    DONE = "DONE"
    ERROR = "ERROR"


class Backend(enum.Enum):
    """Data-path backends a transfer can take."""

    LOCAL = "local"  # same host: process_vm_readv/writev (cross-memory attach)
    TCP = "tcp"  # sockets, zero-copy recv_into; the GPU-less and cross-host fallback
    UCX = "ucx"  # ucxx, optional extra
