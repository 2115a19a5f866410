"""Property tests of what decodes bytes peers send to an exchange (`weft.ep.wire.decode`,
`decode_slot`, and the `Mailbox` that files notifications): any input, random or a valid
message mutated, gives `MalformedMessageError` or the one value those exact bytes encode;
never another exception, never a value that stands for other bytes."""

from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weft.ep import mailbox, wire

U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)
U8 = st.integers(0, 255)

notes = st.builds(wire.Note, st.sampled_from([wire.DISPATCH, wire.ACK, wire.RESULT]), U64, U64, U32, U32, U8)
rejections = st.builds(
    wire.Rejection, U64, U64, U32, U8, st.sampled_from(list(wire.Reject)), st.text(max_size=200)
)
headers = st.builds(wire.SlotHeader, U64, U64, U32, U32, U8)


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid encoding with bytes flipped, cut or appended."""
    raw = bytearray(draw(valid))
    for _ in range(draw(st.integers(0, 4))):
        how = draw(st.sampled_from(["flip", "cut", "add"]))
        if how == "flip" and raw:
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] ^= draw(st.integers(1, 255))
        elif how == "cut" and raw:
            raw = raw[: draw(st.integers(0, len(raw) - 1))]
        else:
            raw += draw(st.binary(min_size=1, max_size=8))
    return bytes(raw)


messages = st.one_of(
    st.binary(max_size=600),
    mutated(notes.map(lambda n: n.encode())),
    mutated(rejections.map(lambda r: r.encode())),
    st.binary(max_size=40).map(lambda b: wire.REJECT + b),
    st.binary(max_size=40).map(lambda b: wire.RESULT + b),
)


@given(notes)
def test_a_note_decodes_to_itself(n: wire.Note) -> None:
    assert wire.decode(n.encode()) == n


@given(rejections)
def test_a_rejection_decodes_to_itself(r: wire.Rejection) -> None:
    assert wire.decode(r.encode()) == r


def test_a_long_reason_is_cut_on_a_character_boundary() -> None:
    r = wire.Rejection(1, 2, 3, 0, wire.Reject.MALFORMED, "é" * wire.REASON_BYTES)
    got = wire.decode(r.encode())
    assert isinstance(got, wire.Rejection) and got.reason == "é" * (wire.REASON_BYTES // 2)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_any_bytes_decode_to_what_they_encode_or_raise_the_typed_error(raw: bytes) -> None:
    try:
        got = wire.decode(raw)
    except wire.MalformedMessageError:
        return
    assert got.encode() == raw  # the value stands for exactly these bytes


@given(headers)
def test_a_slot_header_decodes_to_itself(h: wire.SlotHeader) -> None:
    assert wire.decode_slot(h.encode() + b"\x00" * (wire.HEADER_BYTES - wire.SLOT.size)) == h


@settings(max_examples=200)
@given(st.one_of(st.binary(max_size=64), mutated(headers.map(lambda h: h.encode()))))
def test_any_slot_bytes_decode_to_what_they_encode_or_raise_the_typed_error(raw: bytes) -> None:
    try:
        got = wire.decode_slot(raw)
    except wire.MalformedMessageError:
        return
    assert got.encode() == raw[: wire.SLOT.size]


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages, max_size=8))
def test_the_mailbox_files_what_decodes_and_counts_the_rest(batch: list[bytes]) -> None:
    served: list[wire.Note] = []
    box = mailbox.Mailbox(threading.Condition(), lambda peer, n: served.append(n), "r0")
    bad = 0
    for raw in batch:
        try:
            m = wire.decode(raw)
        except wire.MalformedMessageError:
            bad += 1
        else:
            box.open.add((m.epoch, m.step))  # a step in flight for everything that decodes
        box.deliver("r1", raw)
    assert box.malformed == bad
    filed = len(box.arrived) + len(box.acks) + len(box.rejected) + len(served)
    assert filed <= len(batch) - bad
    for (epoch, step, peer, _round), tokens in box.arrived.items():
        assert peer == "r1" and (epoch, step) in box.open and tokens >= 0


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"WEPD",
        b"WEPD" + b"\x00" * 29,
        b"WEPX\x01",
        wire.REJECT + b"\x00" * 22 + b"\x09",
        b"nonsense" * 10,
    ],
)
def test_known_junk_is_refused_typed(raw: bytes) -> None:
    with pytest.raises(wire.MalformedMessageError):
        wire.decode(raw)
