"""weft.nixl._bindings against NIXL's compiled ``nixl._bindings``: the same names, values and
descriptor-list behaviour (each case runs on both; the real one only where ``import nixl`` works)."""

from __future__ import annotations

import os
import pickle
from types import ModuleType

import numpy as np
import pytest

from weft.nixl import _bindings as weft_bindings


def _real() -> ModuleType | None:
    try:
        import nixl._bindings as real  # type: ignore[import-not-found]
    except Exception:
        return None
    return real  # type: ignore[no-any-return]


IMPLS = [
    pytest.param(weft_bindings, id="weft"),
    pytest.param(
        "real",
        id="nixl",
        marks=pytest.mark.skipif(
            _real() is None and os.environ.get("CI") != "true",  # on CI a missing NIXL fails
            reason="NIXL is not importable",
        ),
    ),
]

NAMES = [
    "DEFAULT_COMM_PORT",
    "NIXL_INIT_AGENT",
    "DRAM_SEG",
    "VRAM_SEG",
    "FILE_SEG",
    "OBJ_SEG",
    "BLK_SEG",
    "NIXL_READ",
    "NIXL_WRITE",
    "NIXL_SUCCESS",
    "NIXL_IN_PROG",
    "NIXL_ERR_BACKEND",
    "NIXL_ERR_NOT_FOUND",
    "NIXL_ERR_INVALID_PARAM",
    "NIXL_THREAD_SYNC_NONE",
    "NIXL_THREAD_SYNC_STRICT",
    "NIXL_THREAD_SYNC_RW",
    "NIXL_THREAD_SYNC_DEFAULT",
    "NIXL_COST_ANALYTICAL_BACKEND",
    "nixlXferDList",
    "nixlRegDList",
    "nixlRemoteDList",
    "nixlXferTelemetry",
    "nixl_mem_t",
    "nixl_status_t",
    "nixl_xfer_op_t",
    "nixl_thread_sync_t",
    "nixlBackendError",
    "nixlCancelledError",
    "nixlInvalidParamError",
    "nixlMismatchError",
    "nixlNoTelemetryError",
    "nixlNotAllowedError",
    "nixlNotFoundError",
    "nixlNotPostedError",
    "nixlNotSupportedError",
    "nixlRemoteDisconnectError",
    "nixlRepostActiveError",
    "nixlUnknownError",
]


@pytest.fixture(params=IMPLS)
def b(request: pytest.FixtureRequest) -> ModuleType:
    return _real() if request.param == "real" else request.param  # type: ignore[return-value]


def test_names_and_values_match_nixl() -> None:
    real = _real()
    for name in NAMES:
        assert hasattr(weft_bindings, name), name
        if real is not None and isinstance(getattr(real, name), int | str):
            assert getattr(weft_bindings, name) == getattr(real, name), name
    for seg in ("DRAM_SEG", "VRAM_SEG", "FILE_SEG", "OBJ_SEG", "BLK_SEG"):
        assert int(getattr(weft_bindings, seg)) == (
            int(getattr(real, seg)) if real else int(getattr(weft_bindings, seg))
        )
    if real is not None:
        assert str(weft_bindings.DRAM_SEG) == str(real.DRAM_SEG) == "nixl_mem_t.DRAM_SEG"
        assert int(weft_bindings.NIXL_ERR_NOT_FOUND) == int(real.NIXL_ERR_NOT_FOUND)


def test_error_classes_are_exceptions(b: ModuleType) -> None:
    for name in NAMES:
        if name.endswith("Error"):
            cls = getattr(b, name)
            assert issubclass(cls, Exception)
            with pytest.raises(cls):
                raise cls("x")


def test_xfer_dlist(b: ModuleType) -> None:
    x = b.nixlXferDList(b.DRAM_SEG, [(1, 2, 3), (4, 5, 6)])
    assert x.descCount() == 2
    assert x.getType() == b.DRAM_SEG
    assert not x.isEmpty()
    assert x[0] == (1, 2, 3)
    assert type(x[1]) is tuple
    assert x.index((4, 5, 6)) == 1
    x[1] = (7, 8, 9)
    assert x[1] == (7, 8, 9)
    x.addDesc((10, 11, 0))
    x.append((12, 13, 0))
    assert x.descCount() == 4
    x.remDesc(0)
    assert x[0] == (7, 8, 9)
    y = b.nixlXferDList(b.DRAM_SEG, np.array([[7, 8, 9], [10, 11, 0], [12, 13, 0]], dtype=np.uint64))
    assert x == y
    assert (x != y) is False
    x.clear()
    assert x.isEmpty()
    empty = b.nixlXferDList(b.VRAM_SEG)
    assert empty.descCount() == 0
    assert empty.getType() == b.VRAM_SEG


def test_reg_dlist_meta_is_bytes_and_trim(b: ModuleType) -> None:
    r = b.nixlRegDList(b.DRAM_SEG, [(1, 2, 3, "a"), (4, 5, 6, "")])
    assert r[0] == (1, 2, 3, b"a")
    assert r[1] == (4, 5, 6, b"")
    t = r.trim()
    assert isinstance(t, b.nixlXferDList)
    assert t[0] == (1, 2, 3)
    assert t.descCount() == 2
    n = b.nixlRegDList(b.FILE_SEG, np.array([[0, 10, 3]], dtype=np.uint64))
    assert n[0] == (0, 10, 3, b"")


def test_dlists_pickle(b: ModuleType) -> None:
    x = b.nixlXferDList(b.DRAM_SEG, [(1, 2, 3), (4, 5, 6)])
    y = pickle.loads(pickle.dumps(x))
    assert y == x
    assert y[1] == (4, 5, 6)
    r = pickle.loads(pickle.dumps(b.nixlRegDList(b.OBJ_SEG, [(0, 9, 1, "key")])))
    assert r[0] == (0, 9, 1, b"key")
    assert r.getType() == b.OBJ_SEG


def test_telemetry_fields(b: ModuleType) -> None:
    t = b.nixlXferTelemetry()
    for field in ("startTime", "postDuration", "xferDuration", "totalBytes", "descCount"):
        assert hasattr(t, field)


def test_weft_index_past_the_end_raises() -> None:
    # NIXL's pybind list reads past its end (no check); weft's raises
    x = weft_bindings.nixlXferDList(weft_bindings.DRAM_SEG, [(1, 2, 3)])
    with pytest.raises(IndexError):
        x[1]
    with pytest.raises(TypeError):
        weft_bindings.nixlXferDList(weft_bindings.DRAM_SEG, [(1, 2)])
