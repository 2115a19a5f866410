"""Property tests of the chunk decoder: whatever bytes a tier hands back, `chunk.decode` gives
the exact payload that was stored under that key, or `Corrupt` (never another exception,
never other bytes)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, assume, given, settings

from weft.api.errors import InvalidKeyError, WeftError
from weft.kvstore import chunk

KEYS = st.one_of(st.text(max_size=40), st.integers(0, 2**128).map(lambda i: f"{i:x}"))
PAYLOADS = st.binary(max_size=6000)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_or_corrupt(blob: bytes, key: str) -> bytes | None:
    try:
        return bytes(chunk.decode(blob, key))
    except chunk.Corrupt:
        return None


@FAST
@given(key=KEYS, data=PAYLOADS)
def test_a_valid_chunk_decodes_to_its_payload(key: str, data: bytes) -> None:
    blob = bytes(chunk.encode(key, data))
    assert len(blob) == chunk.total_size(len(chunk.key_bytes(key)), len(data))
    assert bytes(chunk.decode(blob, key)) == data


@FAST
@given(key=KEYS, blob=st.binary(max_size=9000))
def test_random_bytes_are_corrupt(key: str, blob: bytes) -> None:
    assert _decode_or_corrupt(blob, key) is None  # a random blob passing XXH3-128 would be news


@FAST
@given(
    key=KEYS,
    data=PAYLOADS,
    edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_flipped_bytes_give_corrupt_never_other_bytes(
    key: str, data: bytes, edits: list[tuple[int, int]]
) -> None:
    blob = bytearray(chunk.encode(key, data))
    off = chunk.data_offset(len(chunk.key_bytes(key)))
    for at, xor in edits:
        blob[at % len(blob)] ^= xor
    good = chunk.encode(key, data)
    changed = [i for i in range(len(blob)) if blob[i] != good[i]]
    assume(changed)  # two flips of one byte may cancel out
    got = _decode_or_corrupt(bytes(blob), key)
    # the only bytes no digest covers are the zero pad between the key and the data
    pad_only = all(chunk.HEADER.size + len(chunk.key_bytes(key)) <= i < off for i in changed)
    assert got is None or (pad_only and got == data)


@FAST
@given(key=KEYS, data=PAYLOADS, cut=st.integers(0, 12000), extra=st.binary(min_size=1, max_size=5000))
def test_cut_or_extended_chunks_are_corrupt(key: str, data: bytes, cut: int, extra: bytes) -> None:
    blob = bytes(chunk.encode(key, data))
    assert _decode_or_corrupt(blob[: cut % len(blob)], key) is None
    assert _decode_or_corrupt(blob + extra, key) is None


@FAST
@given(key=KEYS, other=KEYS, data=PAYLOADS)
def test_a_chunk_read_under_another_key_is_corrupt(key: str, other: str, data: bytes) -> None:
    assume(key != other)
    assert _decode_or_corrupt(bytes(chunk.encode(key, data)), other) is None


@FAST
@given(key=KEYS, data=PAYLOADS, length=st.integers(0, 2**64 - 1), klen=st.integers(0, 2**32 - 1))
def test_forged_lengths_in_the_header_are_corrupt(key: str, data: bytes, length: int, klen: int) -> None:
    blob = bytearray(chunk.encode(key, data))
    kb = chunk.key_bytes(key)
    assume((klen, length) != (len(kb), len(data)))
    chunk.HEADER.pack_into(blob, 0, chunk.MAGIC, chunk.FORMAT, chunk.SEGMENT_SHIFT, klen, length)
    assert _decode_or_corrupt(bytes(blob), key) is None


def test_a_large_chunk_of_several_segments_round_trips_and_a_late_flip_is_caught() -> None:
    data = bytes(range(256)) * ((2 * chunk.SEGMENT + 5000) // 256)
    blob = chunk.encode("big", data)
    assert bytes(chunk.decode(blob, "big")) == data
    blob[chunk.data_offset(3) + 2 * chunk.SEGMENT + 7] ^= 1
    with pytest.raises(chunk.Corrupt, match="segment 2"):
        chunk.decode(blob, "big")


def test_corrupt_is_typed_and_a_long_key_is_an_invalid_key() -> None:
    assert issubclass(chunk.Corrupt, WeftError)
    with pytest.raises(InvalidKeyError, match="longer than 4096"):
        chunk.decode(b"", "k" * 5000)
