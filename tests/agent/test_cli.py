"""`weft agent` and `weft status` as a person or the kubelet meets them: real processes, real etcd."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from weft import cli
from weft.testing.etcd import EtcdServer

integration = pytest.mark.integration

TOKEN = "weft-cli-test-join-token-0123456789"
T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.02) -> T:
    """Poll `check` until it returns something other than None/False, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def get(port: int, path: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of GET `path`; errors answered by the server included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2.0) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers.get("Content-Type", ""), e.read()


@dataclass
class AgentProcess:
    name: str
    proc: subprocess.Popen[bytes]
    ready_file: Path
    log_file: Path
    info: dict[str, Any]

    @property
    def http_port(self) -> int:
        return int(self.info["http_port"])

    def status(self) -> dict[str, Any]:
        code, _, body = get(self.http_port, "/status")
        assert code == 200
        doc: dict[str, Any] = json.loads(body)
        return doc

    def member_names(self) -> list[str]:
        return [m["name"] for m in self.status()["members"]]

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "join-token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
def start_agent(etcd: EtcdServer, tmp_path: Path, token_file: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Starts `weft agent` processes and waits for their ready files; kills leftovers."""
    started: list[AgentProcess] = []

    def start(name: str, *extra: str, wait: bool = True) -> AgentProcess:
        """Start one agent; with `wait=False` return at once (`wait_ready` it later), so that
        several start side by side and a busy machine pays for the slowest, not the sum."""
        ready, log_file = tmp_path / f"{name}.ready.json", tmp_path / f"{name}.log"
        cmd = [sys.executable, "-m", "weft.cli", "agent", "--etcd", etcd.endpoint, "--group", "g"]
        cmd += ["--name", name, "--secret-file", str(token_file), "--lease-ttl", "3"]
        cmd += ["--ready-file", str(ready), "--log-level", "INFO", *extra]
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEFT_")}
        with log_file.open("wb") as sink:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, env=env)
        agent = AgentProcess(name, proc, ready, log_file, {})
        started.append(agent)
        if wait:
            wait_ready(agent)
        return agent

    yield start
    for agent in started:
        if agent.proc.poll() is None:
            agent.proc.kill()
        agent.proc.wait(10)


def wait_ready(*agents: AgentProcess, timeout: float = 30.0) -> None:
    """Wait (one deadline for all) until each agent wrote its ready file: joined and serving;
    fail at once if one exited."""

    def all_ready() -> bool:
        for agent in agents:
            if agent.proc.poll() is not None:
                raise AssertionError(f"agent {agent.name} exited ({agent.proc.returncode}):\n{agent.log()}")
        return all(agent.ready_file.exists() for agent in agents)

    wait_for(f"agents {', '.join(a.name for a in agents)} to be ready", all_ready, timeout)
    for agent in agents:
        agent.info = json.loads(agent.ready_file.read_text())


def weft(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEFT_")}
    return subprocess.run(
        [sys.executable, "-m", "weft.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


@integration
def test_agent_answers_health_readiness_metrics_and_status(start_agent: Callable[..., AgentProcess]) -> None:
    a = start_agent("a")
    assert a.info["pid"] == a.proc.pid and a.info["fabric_port"] > 0 and a.info["generation"] > 0
    assert get(a.http_port, "/healthz")[::2] == (200, b"ok\n")
    assert get(a.http_port, "/readyz")[::2] == (200, b"ready\n")
    code, content_type, body = get(a.http_port, "/metrics")
    assert code == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    assert b"\nweft_members 1.0\n" in body
    assert b"\nweft_ready 1.0\n" in body
    doc = a.status()
    assert (doc["name"], doc["phase"], doc["state"], doc["ready"], doc["fenced"]) == (
        "a",
        "joined",
        "active",
        True,
        False,
    )
    assert doc["generation"] == a.info["generation"]
    assert doc["lease_ttl"] == 3
    assert doc["members"] == [
        {"name": "a", "generation": a.info["generation"], "state": "active", "node": socket.gethostname()}
    ]
    wait_for("a to lead", lambda: a.status()["leader"] == "a", 5.0)
    assert get(a.http_port, "/nope")[0] == 404


@integration
def test_two_agents_see_each_other_and_weft_status_lists_both(
    etcd: EtcdServer, start_agent: Callable[..., AgentProcess], token_file: Path
) -> None:
    a, b = start_agent("a"), start_agent("b")
    wait_for("both to see both", lambda: a.member_names() == b.member_names() == ["a", "b"], 5.0)
    leader = wait_for("a leader", lambda: a.status()["leader"], 5.0)

    done = weft("status", "--etcd", etcd.endpoint, "--group", "g", "--secret-file", str(token_file), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    keys = ["group", "namespace", "revision", "leader", "plan_epoch", "plan", "members", "invalid"]
    assert list(report) == keys
    assert (report["group"], report["namespace"], report["leader"]) == ("g", "default", leader)
    assert report["revision"] > 0 and report["invalid"] == []
    assert [m["name"] for m in report["members"]] == ["a", "b"]
    for m, agent in zip(report["members"], (a, b), strict=True):
        assert {"name", "generation", "state", "node", "lease_ttl_left", "role"} <= set(m)
        assert {"verified", "incarnation", "capabilities"} <= set(m)
        assert m["generation"] == agent.info["generation"]
        assert (m["state"], m["node"], m["verified"], m["incarnation"]) == (
            "active",
            socket.gethostname(),
            True,
            0,
        )
        assert m["role"] in (None, "prefill", "decode")  # set once the agent applied a plan
        assert 0 < m["lease_ttl_left"] <= 3
        assert sorted(m["capabilities"]["backends"]) == ["local", "tcp"]
        assert m["http"] == agent.info["http"]

    # the leader's plan, acked by both (ratio 1:3 of two members: one prefill, one decode)
    def planned() -> dict[str, Any] | None:
        done = weft(
            "status", "--etcd", etcd.endpoint, "--group", "g", "--secret-file", str(token_file), "--json"
        )
        plan = json.loads(done.stdout)["plan"]
        return plan if plan and plan["acked"] == ["a", "b"] and set(plan["roles"]) == {"a", "b"} else None

    plan = wait_for("a plan acked by both", planned, 10.0)
    assert sorted(plan["roles"].values()) == ["decode", "prefill"] and plan["verified"]
    assert plan["experts"] == {} and plan["under_replicated"] == [] and plan["epoch"] >= 1

    # without the token: the same members, marked unverified
    done = weft("status", "--etcd", etcd.endpoint, "--group", "g", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [(m["name"], m["verified"]) for m in report["members"]] == [("a", False), ("b", False)]
    assert report["plan"]["verified"] is False and report["plan_epoch"] == report["plan"]["epoch"]

    # the table
    done = weft("status", "--etcd", etcd.endpoint, "--group", "g", "--secret-file", str(token_file))
    assert done.returncode == 0, done.stderr
    for text in ("a", "b", "active", "plan epoch ", "acked by 2/2", "(leader)"):
        assert text in done.stdout


@integration
def test_sigterm_drains_and_the_peer_drops_it_before_the_lease_would(
    etcd: EtcdServer, start_agent: Callable[..., AgentProcess], token_file: Path
) -> None:
    a, b = start_agent("a"), start_agent("b")
    wait_for("a to see b", lambda: a.member_names() == ["a", "b"], 5.0)
    sent = time.monotonic()
    b.proc.send_signal(signal.SIGTERM)
    wait_for("a to drop b", lambda: a.member_names() == ["a"], 1.5, interval=0.01)
    dropped = time.monotonic() - sent
    assert b.proc.wait(5) == 0, b.log()
    assert dropped < 1.5
    assert "SIGTERM: draining and leaving" in b.log()
    assert "left the group" in b.log()
    assert not b.ready_file.exists()
    removed = [e for e in a.status()["events"] if e["kind"] == "removed" and e["name"] == "b"]
    assert [e["reason"] for e in removed] == ["left (drained)"]
    assert get(a.http_port, "/readyz")[0] == 200

    done = weft("status", "--etcd", etcd.endpoint, "--group", "g", "--secret-file", str(token_file), "--json")
    assert [m["name"] for m in json.loads(done.stdout)["members"]] == ["a"]

    a.proc.send_signal(signal.SIGINT)
    assert a.proc.wait(5) == 0, a.log()


def test_status_against_a_dead_etcd_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    assert cli.main(["status", "--etcd", endpoint, "--group", "g", "--timeout", "1"]) == 2
    assert time.monotonic() - start < 5.0
    err = capsys.readouterr().err
    assert f"weft status: cannot reach etcd at {endpoint}" in err


def test_agent_with_bad_settings_exits_1_naming_the_field(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEFT_SECRET", TOKEN)
    rc = cli.main(
        ["agent", "--etcd", "http://127.0.0.1:2379", "--group", "g", "--name", "a", "--lease-ttl", "x"]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "weft agent: lease_ttl" in err and "command line" in err


def test_status_help_documents_the_json(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["status", "--help"])
    out = capsys.readouterr().out
    for key in ("lease_ttl_left", "plan_epoch", "verified", "capabilities", "incarnation"):
        assert key in out


@integration
def test_losing_etcd_is_a_condition_not_unreadiness(
    etcd: EtcdServer, start_agent: Callable[..., AgentProcess]
) -> None:
    """While etcd restarts the agent still serves its known peers: /readyz stays 200 (so a
    PodDisruptionBudget does not see the whole group down), and the loss is reported apart:
    /status ``conditions.etcd`` and the ``weft_etcd_connected`` metric; one log line each way."""
    a = start_agent("a")
    etcd.stop()

    def lost() -> dict[str, Any] | None:
        doc = a.status()
        return doc if doc["conditions"]["etcd"].startswith("lost since ") else None

    doc = wait_for("/status to report etcd lost", lost, 10.0)
    assert doc["ready"] is True and doc["not_ready"] is None
    assert doc["conditions"]["etcd_lost_since"] > 0
    assert get(a.http_port, "/readyz")[::2] == (200, b"ready\n")
    assert get(a.http_port, "/healthz")[0] == 200
    metrics = get(a.http_port, "/metrics")[2]
    assert b"\nweft_ready 1.0\n" in metrics and b"\nweft_etcd_connected 0.0\n" in metrics
    assert b'\nweft_not_ready{reason="fenced"} 0.0\n' in metrics
    assert (_metric(a.http_port, "weft_etcd_lost_seconds") or 0.0) > 0.0
    etcd.start()
    wait_for("etcd to be connected again", lambda: a.status()["conditions"]["etcd"] == "connected", 20.0)
    assert get(a.http_port, "/readyz")[0] == 200
    assert a.status()["state"] == "active"
    assert a.log().count("etcd lost (") == 1 and a.log().count("etcd back after ") == 1


def _rss(pid: int) -> int:
    """Resident bytes of process `pid` (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _metric(port: int, name: str) -> float | None:
    for line in get(port, "/metrics")[2].decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


@integration
def test_the_daemon_drops_notifications_instead_of_keeping_them(
    etcd: EtcdServer, start_agent: Callable[..., AgentProcess], make_agent: Any
) -> None:
    """Nobody in the daemon's process takes notifications: 512 one-MiB messages are counted
    and dropped as they come (resident memory stays bounded), logged once for the episode."""
    from weft.api import records

    a = start_agent("a")
    key = "/weft/v1/default/g/members/a"
    raw = base64.b64decode(json.loads(etcd.etcdctl("get", key, "-w", "json"))["kvs"][0]["value"])
    record = records.unseal(records.MemberRecord, raw, key, TOKEN.encode())
    peer = make_agent("sender", "tcp", secret=TOKEN.encode())
    peer.add_peer(record.fabric_metadata())
    before = _rss(a.proc.pid)
    message = b"n" * ((1 << 20) - 1024)
    count = 512
    for _ in range(count):
        peer.send_notification("a", message)
    wait_for(
        "every notification to be dropped",
        lambda: _metric(a.http_port, "weft_notifications_dropped_total") == count,
        60.0,
        interval=0.1,
    )
    assert _metric(a.http_port, "weft_notification_bytes_dropped_total") == count * len(message)
    grown = _rss(a.proc.pid) - before
    assert grown < 128 << 20, f"the daemon grew by {grown >> 20} MiB for {count} MiB of notifications"
    assert a.log().count("dropping notifications") == 1
    assert get(a.http_port, "/readyz")[0] == 200


@integration
def test_an_expert_source_that_fails_later_is_retried_with_backoff_and_said_once(
    start_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """The store exists but nobody published the experts yet: the agent serves, retries with
    backoff (one warning for the episode, not one per retry) and takes them once published."""
    from weft.engine import publish_experts
    from weft.kvstore import KVStore

    store = tmp_path / "store"
    store.mkdir()
    config = tmp_path / "lmcache-config.yaml"
    config.write_text(
        "chunk_size: 256\nnixl_buffer_size: 1048576\nnixl_buffer_device: cpu\n"
        "extra_config:\n  enable_nixl_storage: true\n  nixl_backend: POSIX\n  nixl_pool_size: 8\n"
        f"  nixl_path: {store}\n"
    )
    a = start_agent("a", "--experts", "2", "--replication", "1", "--expert-source", f"kv:{config}")

    def failures() -> int:
        return int(a.status()["planning_failures"].get("apply", 0))

    wait_for("the planning step to fail 4 times in a row", lambda: failures() >= 4, 30.0, interval=0.1)
    assert a.log().count("failed, retrying with backoff") == 1
    assert get(a.http_port, "/readyz")[0] == 200  # it serves transfers all the same
    weights = {e: np.full(4096, e, np.uint8) for e in range(2)}
    with KVStore.from_lmcache_config(config) as kv:
        published = publish_experts(kv, weights)
    wait_for("the experts to be taken", lambda: len(a.status().get("experts", {})) == 2, 30.0, interval=0.1)
    assert a.status()["experts"] == {str(e): d for e, d in published.items()}
    assert a.status()["planning_failures"] == {}
    assert a.log().count("works again after") == 1
