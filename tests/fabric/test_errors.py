"""Each bad input gives its typed error, and the agent keeps working after it."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.peerproc import digest, pattern
from weft import (
    AgentClosedError,
    InvalidDescriptorError,
    NotificationTimeoutError,
    Op,
    RegistrationError,
    StalePeerError,
    UnknownPeerError,
    UnknownRegionError,
    WeftError,
)

pytestmark = pytest.mark.integration


@pytest.fixture(params=[["tcp"], ["local", "tcp"]], ids="+".join)
def setup(request, make_agent, make_peer):  # type: ignore[no-untyped-def]
    peer = make_peer("b", backends=request.param)
    peer.call("register", "kv", 1 << 16, 1)
    md = peer.call("register", "ro-kv", 4096, 2)
    a = make_agent("a", *request.param)
    a.add_peer(md)
    return a, peer


def _works(a, peer) -> None:  # type: ignore[no-untyped-def]
    src = pattern(4096, 42)
    reg = a.register(src)
    a.write(reg.descs(), "b", a.remote("b", "kv").descs([(4096, 4096)])).wait(timeout=10)
    assert peer.call("digest", "kv", 4096, 4096) == digest(src)
    reg.release()


def test_bad_inputs_are_typed_and_harmless(setup, make_agent) -> None:  # type: ignore[no-untyped-def]
    a, peer = setup
    reg = a.register(np.zeros(8192, np.uint8))
    remote = a.remote("b", "kv")
    cases = [
        (UnknownPeerError, lambda: a.write(reg.descs(), "nobody", remote.descs([(0, 8192)]))),
        (UnknownRegionError, lambda: a.remote("b", "no-such-region")),
        (InvalidDescriptorError, lambda: a.write(reg.descs([(0, 100)]), "b", remote.descs([(0, 101)]))),
        (InvalidDescriptorError, lambda: a.write(reg.descs([(0, 1)] * 2), "b", remote.descs([(0, 1)]))),
        (InvalidDescriptorError, lambda: remote.descs([(0, 1 << 17)])),
        (InvalidDescriptorError, lambda: a.write(reg.descs(), "b", reg.descs())),
        (InvalidDescriptorError, lambda: a.write(reg.descs(), "b", remote.descs([(0, 8192)]), notify="str")),
        (
            InvalidDescriptorError,
            lambda: a.write(reg.descs(), "b", remote.descs([(0, 8192)]), notify=b"x" * (2 << 20)),
        ),
        (InvalidDescriptorError, lambda: a.prepare("sideways", reg.descs(), "b", remote.descs([(0, 8192)]))),
        (NotificationTimeoutError, lambda: a.wait_notification("b", b"never", timeout=0.05)),
    ]
    other = make_agent("other", "tcp")
    foreign = other.register(bytearray(8192))
    cases.append((InvalidDescriptorError, lambda: a.write(foreign.descs(), "b", remote.descs([(0, 8192)]))))
    for cls, call in cases:
        with pytest.raises(cls):
            call()
        _works(a, peer)

    # READ into a read-only local buffer is refused before anything is sent
    ro_local = a.register(b"\x00" * 4096)
    with pytest.raises(RegistrationError, match="read-only"):
        a.read(ro_local.descs(), "b", a.remote("b", "ro-kv").descs())
    # released registrations are refused
    reg.release()
    with pytest.raises(RegistrationError, match="released"):
        reg.descs()
    _works(a, peer)


def test_deregistered_remote_region_fails_typed(setup) -> None:  # type: ignore[no-untyped-def]
    a, peer = setup
    remote = a.remote("b", "ro-kv")
    reg = a.register(np.zeros(4096, np.uint8))
    h = a.prepare(Op.READ, reg.descs(), "b", remote.descs())
    h.post().wait(timeout=10)
    peer.call("release", "ro-kv")
    deadline = time.monotonic() + 5
    while True:  # the INVALIDATE frame races the pipe reply; the tcp path also refuses remotely
        try:
            h.post().wait(timeout=10)
        except UnknownRegionError:
            break
        assert time.monotonic() < deadline, "deregistered region still served"
        time.sleep(0.01)
    _works(a, peer)


def test_closed_agent_refuses(make_agent) -> None:  # type: ignore[no-untyped-def]
    a = make_agent("a", "tcp")
    reg = a.register(bytearray(10))
    a.close()
    with pytest.raises(AgentClosedError):
        a.register(bytearray(10))
    with pytest.raises(AgentClosedError):
        a.add_peer(b"whatever")
    with pytest.raises(WeftError):
        a.write(reg.descs(), "b", reg.descs())
    a.close()  # idempotent


def test_newer_generation_replaces_and_fails_the_old(make_agent, make_peer) -> None:  # type: ignore[no-untyped-def]
    old = make_peer("b", backends=["tcp"], generation=10)
    md_old = old.call("register", "kv", 64 << 20, None)
    a = make_agent("a", "tcp")
    a.add_peer(md_old)
    src = a.register(np.ones(64 << 20, np.uint8))
    old_remote = a.remote("b", "kv")
    h_old = a.prepare(Op.WRITE, src.descs(), "b", old_remote.descs())
    new = make_peer("b", backends=["tcp"], generation=20)  # started first: replace mid-flight
    md_new = new.call("register", "kv", 64 << 20, None)
    h_old.post().wait(timeout=30)
    in_flight = [h_old.post() for _ in range(16)]  # 1 GiB queued to the old generation
    assert a.add_peer(md_new) == "b"
    outcomes = []
    for t in in_flight:
        try:
            t.wait(timeout=10)
            outcomes.append("done")
        except StalePeerError:
            outcomes.append("stale")
    assert "stale" in outcomes, outcomes  # transfers still aimed at the old generation fail
    with pytest.raises(StalePeerError):
        h_old.post()
    with pytest.raises(StalePeerError):
        a.write(src.descs(), "b", old_remote.descs())
    with pytest.raises(StalePeerError, match="not newer"):
        a.add_peer(md_old)
    # the new generation works
    a.write(src.descs(), "b", a.remote("b", "kv").descs()).wait(timeout=30)
    assert new.call("digest", "kv", 0, 64 << 20) == digest(np.ones(64 << 20, np.uint8))
