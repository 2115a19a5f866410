"""LMCache 0.5.6's own NIXL users, unmodified, on the real NIXL and on `weft.nixl`.

Code we did not write is the proof: LMCache's `NixlStorageBackend` (built by its own
`CreateStorageBackends` from the seed's `lmcache-config.yaml`, CPU form), its
`NixlStoreL2Adapter`, and its `nixl` transfer channel between two OS processes. Each case runs
twice, `nixl` (the NIXL 1.5 wheel) and `weft` (`weft.nixl.install()` before LMCache imports
`nixl._api`), each in a fresh interpreter (`tests/nixl/lmcacheproc.py` says why), and both
must give the same answers: the bytes put are the bytes got, a miss is a miss, eviction
evicts, a full pool refuses.

The seed's CPU config does not load as written: LMCache 0.5.6 raises "nixl_buffer_size must
not be set when nixl_buffer_device='cpu'" (its CPU mode stages through LocalCPUBackend's
pinned pool). The working form drops `nixl_buffer_size` and sizes that pool with
`max_local_cpu_size` (GiB); `lmcacheproc.lmcache_config` is it.

Without LMCache (or moto for OBJ) these tests skip, except under `CI=true`, where a missing
service is a broken set-up and fails them. The `weft` cases skip while this tree has no
`weft.nixl` (it comes from the nixl-shim branch).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.s3_fixtures import S3Server

ROOT = Path(__file__).resolve().parents[2]
# weft.nixl's agents take the group's join token from the environment, as a deployment sets it
WEFT_ENV = {"WEFT_SECRET": "weft-lmcache-test-secret-0123456789"}
pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _missing(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(params=["nixl", "weft"])
def flavour(request: pytest.FixtureRequest) -> str:
    if importlib.util.find_spec("lmcache") is None:
        _missing("LMCache is not installed (make setup installs lmcache==0.5.6 with --no-deps)")
    if request.param == "nixl" and importlib.util.find_spec("nixl") is None:
        _missing("NIXL is not installed (make setup installs it)")
    return str(request.param)


def _check_origin(flavour: str, result: dict[str, Any]) -> None:
    origin = result["nixl_api"]
    if flavour == "weft":
        assert "weft" in origin, f"nixl._api came from {origin}, not weft"
    else:
        assert "nixl_cu" in origin, f"nixl._api came from {origin}, not the NIXL wheel"


def env(flavour: str) -> dict[str, str]:
    return {**os.environ, **WEFT_ENV} if flavour == "weft" else dict(os.environ)


def run(flavour: str, scenario: str, args: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    """One scenario in a fresh interpreter; its RESULT line, or a failure with its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.nixl.lmcacheproc", flavour, scenario, json.dumps(args)],
        cwd=ROOT,
        env=env(flavour),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(
            f"{scenario} on {flavour} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    _check_origin(flavour, result)
    return result


def obj_params(server: S3Server, bucket: str) -> dict[str, str]:
    """NIXL's OBJ backend parameters for the test S3 server (path-style, plain http)."""
    return {
        "access_key": server.access_key,
        "secret_key": server.secret_key,
        "bucket": bucket,
        "region": server.region,
        "endpoint_override": server.endpoint,
        "scheme": "http",
        "use_virtual_addressing": "false",
        "req_checksum": "supported",
    }


# ---- NixlStorageBackend: put, get, contains, LRU eviction --------------------------------

POOL, COUNT = 4, 6  # six chunks of 512 KiB into four slots: the two oldest are evicted


def _check_storage(result: dict[str, Any]) -> None:
    evicted = COUNT - POOL
    assert result["contains"] == [False] * evicted + [True] * POOL
    assert result["hit"] == [False] * evicted + [True] * POOL  # an evicted chunk reads as a miss
    assert result["equal"] == [False] * evicted + [True] * POOL  # the tensors put, bit for bit
    assert result["miss"] is True


def test_storage_backend_posix(flavour: str, tmp_path: Path) -> None:
    path = tmp_path / "nixl"
    result = run(flavour, "storage", {"backend": "POSIX", "path": f"{path}/", "pool": POOL, "count": COUNT})
    _check_storage(result)
    # LMCache's static pool: one file per slot, one chunk (512 KiB) each, reused on eviction
    assert result["files"] == POOL
    assert result["file_sizes"] == [512 << 10]


def test_storage_backend_obj(flavour: str, s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    from tests.s3_fixtures import s3_client

    params = obj_params(s3_server, s3_bucket)
    result = run(
        flavour,
        "storage",
        {"backend": "OBJ", "path": str(tmp_path), "pool": POOL, "count": COUNT, "params": params},
    )
    _check_storage(result)
    listing = s3_client(s3_server).list_objects_v2(Bucket=s3_bucket).get("Contents", [])
    # one object per slot of the pool; an evicted chunk's slot was overwritten, not added
    assert len(listing) == POOL
    assert {o["Size"] for o in listing} == {512 << 10}


# ---- NixlStoreL2Adapter: store, lookup+lock, load, full pool, delete, reuse --------------


def _check_l2(result: dict[str, Any]) -> None:
    assert result["store_ok"] is True
    assert result["store_bytes"] == 4 * (64 << 10)
    assert result["full_store_ok"] is False  # the pool is full: the adapter refuses, no overwrite
    assert result["lookup"] == [True, True, True, True, False]
    assert result["load"] == [True] * 4
    assert result["equal"] is True
    assert result["after_delete"] == [False]  # deleted is a miss
    assert result["reuse_store_ok"] is True  # and its slot takes the refused key
    assert result["reuse_load"] == [True]
    assert result["reuse_equal"] is True


# LMCache's NixlStoreL2Adapter hands its whole `backend_params` to
# `nixl_agent.create_backend("POSIX", params)`, its own keys `file_path` and `use_direct_io`
# included: NIXL's POSIX plugin ignores keys it does not know, and so does weft's.


def test_l2_adapter_posix(flavour: str, tmp_path: Path) -> None:
    params = {"file_path": str(tmp_path / "l2"), "use_direct_io": "false"}
    _check_l2(run(flavour, "l2", {"backend": "POSIX", "pool": 4, "params": params}))


def test_l2_adapter_obj(flavour: str, s3_server: S3Server, s3_bucket: str) -> None:
    _check_l2(run(flavour, "l2", {"backend": "OBJ", "pool": 4, "params": obj_params(s3_server, s3_bucket)}))


# ---- the `nixl` transfer channel between two OS processes --------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def channel_server(
    flavour: str, args: dict[str, Any], deadline_s: float = 60
) -> Iterator[subprocess.Popen[str]]:
    """LMCache's channel server in its own process; ready once it says READY."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.nixl.lmcacheproc", flavour, "chan-server", json.dumps(args)],
        cwd=ROOT,
        env=env(flavour),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        end = time.monotonic() + deadline_s
        seen: list[str] = []
        for line in proc.stdout:  # blocks per line; the child prints READY or exits
            seen.append(line)
            if line.startswith("READY"):
                break
            if time.monotonic() > end:
                pytest.fail("channel server not ready within deadline")
        else:
            pytest.fail(f"channel server exited {proc.wait(10)}:\n{''.join(seen)[-4000:]}")
        yield proc
    finally:
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()  # the server's cue to close its context and exit
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()


def test_transfer_channel_two_processes(flavour: str) -> None:
    port_s, port_c = _free_port(), _free_port()
    shape = {"pages": 64, "page": 64 << 10, "seed": 5}
    with channel_server(flavour, {"url": f"127.0.0.1:{port_s}", **shape}):
        result = run(
            flavour,
            "chan-client",
            {"url": f"127.0.0.1:{port_c}", "server": f"127.0.0.1:{port_s}", "obj_pages": 4, **shape},
        )
    assert result["mask"] == [True] * 16
    assert result["equal"] is True  # 16 objects of 256 KiB, read into reversed slots


def test_transfer_channel_server_killed(flavour: str) -> None:
    """The server SIGKILLed after a first READ: LMCache's next READ fails at once, not hung.

    The data path is open (a first READ went through) and then the server dies; the next
    `submit_read` posts to a peer whose connection has dropped. NIXL 1.5 (UCX) raises
    `nixlRemoteDisconnectError` from `transfer`, which LMCache's channel lets through to its
    caller; weft.nixl must end it as fast (within 100 ms) and the same way. A READ already in
    flight when the peer dies is bench/nixl_api.py's `kill` (bench/README.md).
    """
    port_s, port_c = _free_port(), _free_port()
    shape = {"pages": 16, "page": 64 << 10, "seed": 5}
    args = {"url": f"127.0.0.1:{port_c}", "server": f"127.0.0.1:{port_s}", "obj_pages": 4, "pause": True}
    with channel_server(flavour, {"url": f"127.0.0.1:{port_s}", **shape}) as server:
        client = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.nixl.lmcacheproc",
                flavour,
                "chan-client",
                json.dumps({**args, **shape, "deadline": 10}),
            ],
            cwd=ROOT,
            env=env(flavour),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert client.stdin is not None and client.stdout is not None
        try:
            seen = []
            for line in client.stdout:
                seen.append(line)
                if line.startswith("CONNECTED"):
                    break
            else:
                pytest.fail(f"client exited {client.wait(10)}:\n{''.join(seen)[-4000:]}")
            server.kill()
            server.wait(10)
            client.stdin.write("go\n")
            client.stdin.flush()
            out, _ = client.communicate(timeout=60)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(10)
    lines = [ln for ln in (("".join(seen)) + out).splitlines() if ln.startswith("RESULT ")]
    assert lines, out[-4000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    _check_origin(flavour, result)
    assert result["elapsed_s"] < 0.1  # posted, answered: no wait on a dead peer
    if "raised" not in result:
        assert result["mask"] == [False] * 4  # finished, every object failed
        return
    # NIXL raises nixlRemoteDisconnectError (NIXL_ERR_REMOTE_DISCONNECT); weft's PeerLostError
    # surfaces as the same class, so a client's `except` catches both
    assert result["raised"].startswith("nixlRemoteDisconnectError")
