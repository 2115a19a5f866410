"""The chunk checksum: XXH3-128, the only module that imports xxhash.

It guards against torn writes and flipped bits, not against an attacker (the storage tier is
trusted like local disk), so speed decides: measured here, XXH3-128 hashes 25 GB/s against
BLAKE2b's 1.2 GB/s and zlib's CRC-32 5.5 GB/s, and BLAKE2b alone held the POSIX tier to
under 1 GB/s.
"""

from __future__ import annotations

from typing import Any

import xxhash

DIGEST_BYTES = 16


class Checksum:
    """Incremental XXH3-128 over buffers."""

    __slots__ = ("_h",)

    def __init__(self, first: Any = b"") -> None:
        self._h = xxhash.xxh3_128(first)

    def update(self, data: Any) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        return bytes(self._h.digest())


def digest(data: Any) -> bytes:
    """XXH3-128 of one buffer, at once (the GIL is released while it hashes)."""
    return xxhash.xxh3_128_digest(data)
