"""The chunk format (version 2), shared by every tier: one KV chunk, self-describing, checked.

::

    header | key | zero pad to 4096 | data | segment digests | final digest

The header (magic ``WEFTKV``, format, segment shift, key length, data length) sizes
everything. The data starts on a 4096-byte boundary, so a file tier can move it with
``O_DIRECT``. The data is hashed in segments of 4 MiB (XXH3-128 each, `weft.kvstore._hash`),
so several threads can read or write one large chunk and check each part while it is still
in cache; the final digest covers header, key and every segment digest. A chunk copied from
one tier to another (a file to an object) keeps its bytes.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from weft.api import errors
from weft.kvstore import _hash

MAGIC = b"WEFTKV"
FORMAT = 2
HEADER = struct.Struct("<6sBBIQ")  # magic, format, segment shift, key length, data length
SEGMENT_SHIFT = 22
SEGMENT = 1 << SEGMENT_SHIFT  # bytes per segment digest
ALIGN = 4096
DIGEST = _hash.DIGEST_BYTES
MAX_KEY_BYTES = 4096


class Corrupt(errors.WeftError):
    """A chunk failed a check (the reason is the message); callers turn it into a miss."""


def key_bytes(key: str) -> bytes:
    """The key as stored inside its chunk (UTF-8, lone surrogates kept).

    Raises:
        InvalidKeyError: the key is longer than `MAX_KEY_BYTES` encoded.
    """
    kb = key.encode("utf-8", "surrogatepass")
    if len(kb) > MAX_KEY_BYTES:
        raise errors.InvalidKeyError(f"key {key[:64]!r}... of {len(kb)} bytes is longer than {MAX_KEY_BYTES}")
    return kb


def key_hash(key: str) -> str:
    """The hex SHA-256 a tier names the chunk by (keys may hold any character)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def data_offset(key_len: int) -> int:
    return -(-(HEADER.size + key_len) // ALIGN) * ALIGN


def segments(data_len: int) -> int:
    return -(-data_len // SEGMENT)


def total_size(key_len: int, data_len: int) -> int:
    return data_offset(key_len) + data_len + DIGEST * (segments(data_len) + 1)


def data_len(size: int, key_len: int) -> int | None:
    """The data length of a chunk of `size` bytes for this key, or None when none fits."""
    rest = size - data_offset(key_len) - DIGEST
    if rest < 0:
        return None
    for n in (rest // (SEGMENT + DIGEST), rest // (SEGMENT + DIGEST) + 1):
        d = rest - DIGEST * n
        if d >= 0 and segments(d) == n:
            return d
    return None


def head(kb: bytes, dlen: int) -> bytes:
    """Header, key and pad: everything before the data."""
    header = HEADER.pack(MAGIC, FORMAT, SEGMENT_SHIFT, len(kb), dlen)
    return header + kb + bytes(data_offset(len(kb)) - HEADER.size - len(kb))


def final_digest(head_: Any, key_len: int, seg_digests: Any) -> bytes:
    return _hash.digest(bytes(head_[: HEADER.size + key_len]) + bytes(seg_digests))


def check_head(head_: Any, kb: bytes, dlen: int) -> None:
    """Raise `Corrupt` unless `head_` starts with this format's header for key `kb` and a
    data length of `dlen`."""
    if len(head_) < HEADER.size + len(kb):
        raise Corrupt("truncated header")
    magic, fmt, shift, klen, hlen = HEADER.unpack_from(head_)
    if magic != MAGIC or fmt != FORMAT or shift != SEGMENT_SHIFT:
        raise Corrupt("not a weft chunk of this format")
    if klen != len(kb) or head_[HEADER.size : HEADER.size + klen] != kb:
        raise Corrupt("the key inside is another")
    if hlen != dlen:
        raise Corrupt("truncated: the length is not the one its header says")


def check_digests(head_: Any, kb: bytes, foot: Any) -> None:
    """The final digest over header, key and the segment digests in `foot`."""
    if len(foot) < DIGEST or len(foot) % DIGEST:
        raise Corrupt("truncated digests")
    nseg = (len(foot) // DIGEST) - 1
    if final_digest(head_, len(kb), memoryview(foot)[: DIGEST * nseg]) != foot[DIGEST * nseg :]:
        raise Corrupt("checksum mismatch")


def encode(key: str, data: Any) -> bytearray:
    """One whole chunk of `data` (a byte buffer) under `key`, as every tier stores it."""
    kb = key_bytes(key)
    view = memoryview(data).cast("B")
    dlen = view.nbytes
    head_ = head(kb, dlen)
    off, nseg = len(head_), segments(dlen)
    body = bytearray(total_size(len(kb), dlen))
    body[:off] = head_
    body[off : off + dlen] = view
    seg = b"".join(_hash.digest(view[i * SEGMENT : (i + 1) * SEGMENT]) for i in range(nseg))
    body[off + dlen : off + dlen + len(seg)] = seg
    body[off + dlen + len(seg) :] = final_digest(head_, len(kb), seg)
    return body


def check_segments(data: Any, foot: Any) -> None:
    """Each 4 MiB segment of `data` against its digest in `foot`."""
    view = memoryview(data)
    for i in range(segments(view.nbytes)):
        if _hash.digest(view[i * SEGMENT : (i + 1) * SEGMENT]) != bytes(foot[DIGEST * i : DIGEST * (i + 1)]):
            raise Corrupt(f"checksum mismatch in segment {i}")


def decode(blob: Any, key: str) -> memoryview:
    """The data of a whole chunk `blob` stored under `key`, every check passed.

    Returns:
        A view of `blob` holding exactly the bytes that were stored.

    Raises:
        Corrupt: the blob is not a chunk of this format for this key, or fails a length,
            header or digest check (it is never returned in part).
        InvalidKeyError: the key is too long.
    """
    kb = key_bytes(key)
    view = memoryview(blob).cast("B")
    dlen = data_len(view.nbytes, len(kb))
    if dlen is None:
        raise Corrupt("truncated: no chunk has this length")
    off = data_offset(len(kb))
    check_head(view[:off], kb, dlen)
    data, foot = view[off : off + dlen], view[off + dlen :]
    if len(foot) != DIGEST * (segments(dlen) + 1):
        raise Corrupt("truncated digests")
    check_segments(data, foot)
    check_digests(view[:off], kb, foot)
    return data
