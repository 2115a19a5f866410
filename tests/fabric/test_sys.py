"""Cross-memory-attach helpers: splitting iovec lists for parallel copies."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
from hypothesis import given, settings

from weft.fabric import _sys


def _expand(iov: np.ndarray) -> np.ndarray:
    return np.concatenate([np.arange(int(b), int(b) + int(n), dtype=np.uint64) for b, n in iov])


@given(
    st.lists(
        st.tuples(st.integers(1, 5000), st.integers(0, 1 << 40), st.integers(0, 1 << 40)),
        min_size=1,
        max_size=20,
    ),
    st.integers(2, 4),
)
@settings(max_examples=200, deadline=None)
def test_split_covers_every_byte_once_in_order(descs: list[tuple[int, int, int]], parts: int) -> None:
    lengths = np.array([d[0] for d in descs], np.uint64)
    local = _sys.make_iovecs(np.array([d[1] for d in descs], np.uint64), lengths)
    remote = _sys.make_iovecs(np.array([d[2] for d in descs], np.uint64), lengths)
    pieces = _sys.split_iovecs(local, remote, parts)
    assert 1 <= len(pieces) <= parts
    assert np.array_equal(np.concatenate([_expand(p[0]) for p in pieces]), _expand(local))
    assert np.array_equal(np.concatenate([_expand(p[1]) for p in pieces]), _expand(remote))
    for lo, ro in pieces:
        assert (lo[:, 1] > 0).all()
        assert np.array_equal(lo[:, 1], ro[:, 1])
