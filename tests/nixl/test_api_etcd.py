"""weft.nixl's central metadata server: NIXL_ETCD_ENDPOINTS, on a real etcd.

Metadata goes to etcd with ``send_local_metadata()``, comes back with
``fetch_remote_metadata(name)``, leaves with ``invalidate_local_metadata()``; an agent that
dies (SIGKILL, no goodbye) leaves within its lease's TTL and its fetchers drop it, as
NIXL's etcd watchers do.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from weft.nixl import _api as weft_api
from weft.nixl import _bindings as nb
from weft.testing.etcd import EtcdServer

pytestmark = pytest.mark.integration

SECRET = "weft-test-secret-0123456789abcdef"
TTL = 3


def wait_for(cond: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout} s")


def _keys(etcd: EtcdServer, prefix: str) -> str:
    return etcd.etcdctl("get", "--prefix", prefix, "--keys-only").strip()


@pytest.fixture
def etcd_env(etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    env = {
        "NIXL_ETCD_ENDPOINTS": etcd.endpoint,
        "NIXL_ETCD_NAMESPACE": "/nixl/test-agents",
        "WEFT_NIXL_ETCD_TTL": str(TTL),
        "WEFT_SECRET": SECRET,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield env


def test_publish_fetch_read_and_invalidate(etcd: EtcdServer, etcd_env: dict[str, str]) -> None:
    a = weft_api.nixl_agent("etcd-a")
    b = weft_api.nixl_agent("etcd-b")
    try:
        src = np.arange(8192, dtype=np.uint8)
        dst = np.zeros(8192, np.uint8)
        a.register_memory([(src.ctypes.data, src.nbytes, 0, "")], "DRAM")
        b.register_memory([(dst.ctypes.data, dst.nbytes, 0, "")], "DRAM")
        a.send_local_metadata()
        wait_for(
            lambda: etcd.etcdctl("get", "--prefix", "/nixl/test-agents/etcd-a/", "--keys-only").strip(), 10
        )
        b.fetch_remote_metadata("etcd-a")
        wait_for(lambda: b.check_remote_metadata("etcd-a"), 10)
        local = b.prep_xfer_dlist("", [(dst.ctypes.data, 8192, 0)], "DRAM")
        remote = b.prep_xfer_dlist("etcd-a", [(src.ctypes.data, 8192, 0)], "DRAM")
        h = b.make_prepped_xfer("READ", local, [0], remote, [0])
        b.transfer(h)
        assert wait_for(lambda: (s := b.check_xfer_state(h)) != "PROC" and s, 10) == "DONE"
        assert (dst == src).all()
        a.invalidate_local_metadata()
        # b's watcher looks every TTL/3 and drops an agent whose metadata left etcd
        wait_for(lambda: not b.check_remote_metadata("etcd-a"), TTL + 5)
    finally:
        a.close()
        b.close()
    # closing revoked the lease: nothing of either agent is left in etcd
    assert _keys(etcd, "/nixl/test-agents/") == ""


def test_without_etcd_the_central_calls_say_how(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NIXL_ETCD_ENDPOINTS", raising=False)
    monkeypatch.setenv("WEFT_SECRET", SECRET)
    a = weft_api.nixl_agent("no-etcd")
    try:
        with pytest.raises(nb.nixlNotSupportedError, match="NIXL_ETCD_ENDPOINTS"):
            a.send_local_metadata()
        with pytest.raises(nb.nixlNotSupportedError, match="NIXL_ETCD_ENDPOINTS"):
            a.fetch_remote_metadata("x")
    finally:
        a.close()
    monkeypatch.setenv("NIXL_ETCD_ENDPOINTS", "ftp://nowhere")
    with pytest.raises(nb.nixlInvalidParamError, match="NIXL_ETCD_ENDPOINTS"):
        weft_api.nixl_agent("bad-etcd")


def test_a_killed_agent_leaves_etcd_within_its_ttl_and_is_dropped(
    etcd: EtcdServer, etcd_env: dict[str, str]
) -> None:
    child = textwrap.dedent(
        """
        import sys, time, numpy as np
        from weft.nixl import _api
        a = _api.nixl_agent("etcd-doomed")
        buf = np.ones(4096, np.uint8)
        a.register_memory([(buf.ctypes.data, 4096, 0, "")], "DRAM")
        a.send_local_metadata()
        print("READY", flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, env=None)
    b = weft_api.nixl_agent("etcd-survivor")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY"
        wait_for(
            lambda: etcd.etcdctl("get", "/nixl/test-agents/etcd-doomed/metadata", "--keys-only").strip(), 10
        )
        b.fetch_remote_metadata("etcd-doomed")
        wait_for(lambda: b.check_remote_metadata("etcd-doomed"), 10)
        proc.kill()
        proc.wait(10)
        # the lease expires at most TTL after its last refresh; the watcher looks every TTL/3
        wait_for(lambda: not b.check_remote_metadata("etcd-doomed"), TTL + TTL / 3 + 5)
        assert _keys(etcd, "/nixl/test-agents/etcd-doomed/") == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        b.close()
