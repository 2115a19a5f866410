"""The fabric's enums, declared once in `weft.api.vocab` and named here for the fabric's modules."""

from __future__ import annotations

from weft.api.vocab import Backend, MemoryKind, Op, TransferState

__all__ = ["Backend", "MemoryKind", "Op", "TransferState"]
