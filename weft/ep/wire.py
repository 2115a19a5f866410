"""The exchange's messages and slot layout, in one place so the sender, the server and the
step logic agree on every byte.

Notifications (little-endian): ``WEPD`` dispatch, ``WEPA`` acknowledgement and ``WEPR``
results carry (epoch, step, rank, tokens, round); ``WEPX`` rejects (epoch, step, rank, round,
code) plus a reason in UTF-8. The acknowledgement is sent by the receiver as soon as a batch
arrives, before it is served (a sign of life; masking follows the data path, see
`weft.ep.step`).

A slot holds a header (``WEPS``, epoch, step, rank, tokens, round), room for `max_tokens`
expert ids (int32) and then the rows, so one contiguous range covers a batch.

Everything here that reads bytes a peer sent (`decode`, `decode_slot`) either returns the
one value those bytes encode (encoding it again gives the same bytes) or raises
`MalformedMessageError`; nothing else.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from weft.fabric import errors

NOTE = struct.Struct("<4sQQIIB")  # magic, epoch, step, rank, tokens, round
REJECT_NOTE = struct.Struct("<4sQQIBB")  # magic, epoch, step, rank, round, code
SLOT = struct.Struct("<4sQQIIB")  # magic, epoch, step, rank, tokens, round (the slot's header)
SLOT_MAGIC = b"WEPS"
HEADER_BYTES = 64
DISPATCH, ACK, RESULT, REJECT = b"WEPD", b"WEPA", b"WEPR", b"WEPX"
REASON_BYTES = 512  # most bytes of a rejection's reason on the wire


class EpError(errors.WeftError):
    """An expert-parallel step failed."""


class EpochMismatchError(EpError):
    """A peer is on another plan epoch: the step started on `epoch` cannot finish on it."""


class MalformedMessageError(EpError):
    """Bytes from a peer that are not a message or slot header of the exchange."""


class Reject(enum.IntEnum):
    """Why a rank refused a batch (the code of a ``WEPX`` message)."""

    STALE = 1  # the message's epoch is older than the receiver's
    AHEAD = 2  # newer than the receiver's (it has not seen that plan yet)
    MALFORMED = 3
    NOT_HOSTED = 4  # a token for an expert this rank does not host in that epoch


@dataclass(frozen=True)
class Note:
    """A dispatch, acknowledgement or results notification (`kind` is its magic)."""

    kind: bytes
    epoch: int
    step: int
    rank: int
    tokens: int
    round: int

    def encode(self) -> bytes:
        """The notification's bytes."""
        return NOTE.pack(self.kind, self.epoch, self.step, self.rank, self.tokens, self.round)


@dataclass(frozen=True)
class Rejection:
    """A ``WEPX`` message: the batch (epoch, step, round) that `rank` refused, and why."""

    epoch: int
    step: int
    rank: int
    round: int
    code: Reject
    reason: str

    def encode(self) -> bytes:
        """The message's bytes (the reason cut to `REASON_BYTES` on a character boundary)."""
        reason = self.reason.encode()[:REASON_BYTES].decode(errors="ignore").encode()
        return REJECT_NOTE.pack(REJECT, self.epoch, self.step, self.rank, self.round, self.code) + reason


@dataclass(frozen=True)
class SlotHeader:
    """The header of a slot: whose batch (or results) it holds."""

    epoch: int
    step: int
    rank: int
    tokens: int
    round: int

    def encode(self) -> bytes:
        return SLOT.pack(SLOT_MAGIC, self.epoch, self.step, self.rank, self.tokens, self.round)


def decode(msg: bytes) -> Note | Rejection:
    """A notification of the exchange.

    Args:
        msg: the notification's bytes, as received.

    Returns:
        The `Note` or `Rejection` they encode.

    Raises:
        MalformedMessageError: an unknown kind, a wrong length, an unknown rejection code or
            a reason that is not UTF-8 (or longer than `REASON_BYTES`).
    """
    kind = bytes(msg[:4])
    if kind in (DISPATCH, ACK, RESULT):
        if len(msg) != NOTE.size:
            raise MalformedMessageError(f"a {kind!r} notification of {len(msg)} bytes, not {NOTE.size}")
        _, epoch, step, rank, tokens, round_ = NOTE.unpack(msg)
        return Note(kind, epoch, step, rank, tokens, round_)
    if kind == REJECT:
        if not REJECT_NOTE.size <= len(msg) <= REJECT_NOTE.size + REASON_BYTES:
            raise MalformedMessageError(f"a rejection of {len(msg)} bytes")
        _, epoch, step, rank, round_, code = REJECT_NOTE.unpack(msg[: REJECT_NOTE.size])
        try:
            why = Reject(code)
            reason = bytes(msg[REJECT_NOTE.size :]).decode()
        except (ValueError, UnicodeDecodeError) as exc:  # ValueError: not a Reject code
            raise MalformedMessageError(f"a rejection that does not decode: {exc}") from None
        return Rejection(epoch, step, rank, round_, why, reason)
    raise MalformedMessageError(f"not a message of the exchange ({len(msg)} bytes, kind {kind!r})")


def decode_slot(raw: bytes) -> SlotHeader:
    """The header at the start of a slot.

    Args:
        raw: the slot's first `SLOT.size` bytes (or more: the rest is not read).

    Raises:
        MalformedMessageError: too short, or no slot header there.
    """
    if len(raw) < SLOT.size:
        raise MalformedMessageError(f"a slot header of {len(raw)} bytes, not {SLOT.size}")
    magic, epoch, step, rank, tokens, round_ = SLOT.unpack(raw[: SLOT.size])
    if magic != SLOT_MAGIC:
        raise MalformedMessageError("no slot header")
    return SlotHeader(epoch, step, rank, tokens, round_)
