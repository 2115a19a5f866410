"""The exchange's messages and slot layout, in one place so the sender, the server and the
step logic agree on every byte.

Notifications (little-endian): ``WEPD`` dispatch, ``WEPA`` acknowledgement and ``WEPR``
results carry (epoch, step, rank, tokens, round); ``WEPX`` rejects (epoch, step, rank, round,
code) plus a reason. The acknowledgement is sent by the receiver as soon as a batch arrives,
before it is served: it is how a sender tells a rank that is slow (it acknowledged, its
results are late) from one that is gone or frozen (it did not even acknowledge).

A slot holds a header (``WEPS``, epoch, step, rank, tokens), room for `max_tokens` expert ids
(int32) and then the rows, so one contiguous range covers a batch.
"""

from __future__ import annotations

import enum
import struct

from weft.fabric import errors

NOTE = struct.Struct("<4sQQIIB")  # magic, epoch, step, rank, tokens, round
REJECT_NOTE = struct.Struct("<4sQQIBB")  # magic, epoch, step, rank, round, code
SLOT = struct.Struct("<4sQQII")  # magic, epoch, step, rank, tokens (the slot's own header)
SLOT_MAGIC = b"WEPS"
HEADER_BYTES = 64
DISPATCH, ACK, RESULT, REJECT = b"WEPD", b"WEPA", b"WEPR", b"WEPX"
REASON_BYTES = 512  # most bytes of a rejection's reason on the wire


class EpError(errors.WeftError):
    """An expert-parallel step failed."""


class EpochMismatchError(EpError):
    """A peer is on another plan epoch: the step started on `epoch` cannot finish on it."""


class Reject(enum.IntEnum):
    """Why a rank refused a batch (the code of a ``WEPX`` message)."""

    STALE = 1  # the message's epoch is older than the receiver's
    AHEAD = 2  # newer than the receiver's (it has not seen that plan yet)
    MALFORMED = 3
    NOT_HOSTED = 4  # a token for an expert this rank does not host in that epoch
