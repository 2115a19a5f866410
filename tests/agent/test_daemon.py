"""The node agent's pieces: settings from their sources, the HTTP endpoint, metrics, run_agent."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from weft.agent import daemon
from weft.api import agent_settings
from weft.api.agent_settings import AgentSettings
from weft.api.settings import EtcdSettings, GroupRef
from weft.engine import http as agent_http
from weft.engine import metrics as agent_metrics
from weft.fabric.errors import ConfigError, WeftError
from weft.membership.member import MemberConfig, Membership
from weft.testing.etcd import EtcdServer

integration = pytest.mark.integration

TOKEN = "weft-test-join-token-0123456789"
BASE_ENV = {"WEFT_NAME": "a", "WEFT_GROUP": "g", "WEFT_SECRET": TOKEN}


def load(
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
    config_file: Path | None = None,
) -> AgentSettings:
    return daemon.load_agent_settings(config_file, BASE_ENV if env is None else env, overrides or {})


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- settings: defaults and precedence ---------------------------------------------------------
def test_defaults() -> None:
    s = load()
    assert (s.name, s.group.group, s.group.namespace) == ("a", "g", "default")
    assert s.etcd.endpoints == ["http://127.0.0.1:2379"]
    assert s.lease_ttl == 3.0
    assert s.backends == ["local", "tcp"]
    assert (s.listen_host, s.listen_port, s.advertise_host) == ("127.0.0.1", 0, None)
    assert (s.http_host, s.http_port) == ("127.0.0.1", 0)
    assert (s.drain_timeout, s.join_timeout) == (30.0, 30.0)
    assert s.node == socket.gethostname()
    assert len(s.instance) == 32
    assert s.join_token() == TOKEN.encode()
    assert load().instance != s.instance  # random per process unless POD_UID is set
    assert s.http_address(8080) == "127.0.0.1:8080"


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    config = write(
        tmp_path / "agent.yaml",
        "name: from-file\n"
        "group: {namespace: ns-file, group: g-file}\n"
        "etcd: {endpoints: ['http://file:2379'], request_timeout: 5}\n"
        "lease_ttl: 7\n"
        "http_port: 9000\n"
        "drain_timeout: 12\n"
        "backends: [tcp]\n",
    )
    env = {"WEFT_NAME": "from-env", "WEFT_GROUP": "g-env", "WEFT_LEASE_TTL": "5", "WEFT_SECRET": TOKEN}
    env |= {"WEFT_ETCD": "http://e1:2379, http://e2:2379", "WEFT_HTTP_PORT": "9100"}
    s = load(env, {"name": "from-flag", "lease_ttl": "4", "group": {"namespace": None}}, config)
    assert s.name == "from-flag"  # flag > env > file
    assert s.lease_ttl == 4.0
    assert s.group == GroupRef(namespace="ns-file", group="g-env")  # a None flag is not given
    assert s.etcd.endpoints == ["http://e1:2379", "http://e2:2379"]
    assert s.etcd.request_timeout == 5.0  # sections merge field by field
    assert s.http_port == 9100
    assert s.drain_timeout == 12.0
    assert s.backends == ["tcp"]


def test_every_environment_variable_lands_in_its_field(tmp_path: Path) -> None:
    ca, cert, key = (write(tmp_path / n, "pem") for n in ("ca.pem", "cert.pem", "key.pem"))
    env = {
        "WEFT_NAME": "n1",
        "WEFT_GROUP": "grp",
        "WEFT_NAMESPACE": "ns",
        "WEFT_ETCD": "https://x:1,https://y:2",
        "WEFT_ETCD_CA": str(ca),
        "WEFT_ETCD_CERT": str(cert),
        "WEFT_ETCD_KEY": str(key),
        "WEFT_ETCD_USER": "u",
        "WEFT_ETCD_PASSWORD": "pw",
        "WEFT_LEASE_TTL": "2.5",
        "WEFT_SECRET": TOKEN,
        "WEFT_LISTEN_HOST": "0.0.0.0",
        "WEFT_ADVERTISE_HOST": "10.0.0.7",
        "WEFT_LISTEN_PORT": "7000",
        "WEFT_BACKENDS": "tcp,local",
        "WEFT_HTTP_HOST": "0.0.0.0",
        "WEFT_HTTP_PORT": "7001",
        "WEFT_DRAIN_TIMEOUT": "9",
        "WEFT_JOIN_TIMEOUT": "4",
        "WEFT_KV_POOL_BYTES": "1048576",
        "WEFT_NODE": "node-7",
        "WEFT_RATIO": "1:2",
        "WEFT_MIN_PREFILL": "1",
        "WEFT_MIN_DECODE": "2",
        "WEFT_EXPERTS": "64",
        "WEFT_REPLICATION": "2",
        "WEFT_REDUNDANT_SLOTS": "8",
        "WEFT_EXPERT_SOURCE": "synthetic:4096",
        "WEFT_ROLE_POLICY": "load",
        "WEFT_HIGH_QUEUE": "6",
        "WEFT_LOW_QUEUE": "1.5",
        "WEFT_SETTLE_SECONDS": "20",
        "WEFT_TTFT_P90_MS": "800",
        "WEFT_ITL_P90_MS": "60",
        "WEFT_KV_POOL_FILE": str(tmp_path / "pool"),
        "WEFT_ENGINE_METRICS": "http://127.0.0.1:8000/metrics",
        "WEFT_ENGINE_HOOK": "http://127.0.0.1:8000/weft",
        "POD_UID": "0b6f0a2e-8c1d-4f3a-9a51-6f7d2c4e9b10",
        "WEFT_MAX_UNAUTHENTICATED": "32",
        "WEFT_MAX_DESCRIPTORS": "4096",
        "WEFT_MAX_STAGING_BYTES": "33554432",
        "WEFT_MAX_NOTIFICATION_BYTES": "65536",
        "WEFT_MAX_PENDING_NOTIFICATIONS": "100",
        "WEFT_MAX_PENDING_NOTIFICATION_BYTES": "1048576",
        "UNRELATED": "ignored",
    }
    s = load(env)
    assert set(agent_settings.ENVIRONMENT) - set(env) == {"WEFT_SECRET_FILE"}  # tested below
    assert (s.name, s.group.namespace, s.group.group) == ("n1", "ns", "grp")
    assert s.etcd.endpoints == ["https://x:1", "https://y:2"]
    assert (s.etcd.ca_file, s.etcd.cert_file, s.etcd.key_file) == (ca, cert, key)
    assert s.etcd.username == "u" and s.etcd.password is not None
    assert s.etcd.password.get_secret_value() == "pw"
    assert (s.lease_ttl, s.listen_host, s.advertise_host, s.listen_port) == (2.5, "0.0.0.0", "10.0.0.7", 7000)
    assert s.backends == ["tcp", "local"]
    p = s.planning
    assert p.expert_source == "synthetic:4096"
    assert (p.ratio, p.min_prefill, p.min_decode, p.experts, p.replication, p.redundant_slots) == (
        "1:2",
        1,
        2,
        64,
        2,
        8,
    )
    assert (s.http_host, s.http_port, s.drain_timeout, s.join_timeout) == ("0.0.0.0", 7001, 9.0, 4.0)
    assert (p.policy, p.high_queue, p.low_queue, p.settle_seconds) == ("load", 6.0, 1.5, 20.0)
    assert (p.ttft_p90_ms, p.itl_p90_ms) == (800.0, 60.0)
    assert s.kv_pool_bytes == 1 << 20 and s.kv_pool_file == tmp_path / "pool"
    assert s.engine_metrics_url == "http://127.0.0.1:8000/metrics"
    assert s.engine_hook_url == "http://127.0.0.1:8000/weft"
    assert (s.node, s.instance) == ("node-7", env["POD_UID"])
    assert s.fabric_host == "10.0.0.7"
    assert s.http_address(7001) == "10.0.0.7:7001"  # a wildcard is not an address to publish
    lim = s.limits
    assert (lim.max_unauthenticated, lim.max_descriptors, lim.max_staging_bytes) == (32, 4096, 32 << 20)
    assert (lim.max_notification_bytes, lim.max_pending_notifications) == (64 << 10, 100)
    assert lim.max_pending_notification_bytes == 1 << 20


def test_empty_environment_values_count_as_unset() -> None:
    s = load(BASE_ENV | {"WEFT_LEASE_TTL": "", "WEFT_ETCD": " "})
    assert s.lease_ttl == 3.0
    assert s.etcd.endpoints == ["http://127.0.0.1:2379"]


def test_json_config_file_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    write(tmp_path / "conf" / "token", TOKEN + "\n")
    config = write(
        tmp_path / "conf" / "agent.json",
        json.dumps(
            {
                "name": "j",
                "group": {"group": "g"},
                "secret_file": "token",
                "etcd": {"endpoints": ["https://e:2379"], "ca_file": "ca.pem"},
            }
        ),
    )
    s = load({}, {}, config)
    assert s.secret_file == tmp_path / "conf" / "token"
    assert s.etcd.ca_file == tmp_path / "conf" / "ca.pem"
    assert s.join_token() == TOKEN.encode()  # surrounding whitespace dropped


def test_an_upper_source_of_the_token_replaces_both_below(tmp_path: Path) -> None:
    token_file = write(tmp_path / "token", "file-token-0123456789abcdef")
    config = write(tmp_path / "a.yaml", f"name: a\ngroup: {{group: g}}\nsecret_file: {token_file}\n")
    from_env = load({"WEFT_SECRET": TOKEN}, {}, config)
    assert (from_env.secret_file, from_env.join_token()) == (None, TOKEN.encode())
    from_flag = load({"WEFT_SECRET": TOKEN}, {"secret_file": str(token_file)}, config)
    assert from_flag.secret is None
    assert from_flag.join_token() == b"file-token-0123456789abcdef"


def test_a_section_given_whole_and_by_field_does_not_crash(tmp_path: Path) -> None:
    config = write(tmp_path / "a.yaml", "group: g-as-a-string\n")
    assert load(BASE_ENV, {}, config).group.group == "g"  # the variable replaces the bad section
    expect_error(
        "group: Input should be a valid dictionary",
        "config file",
        env={"WEFT_SECRET": TOKEN, "WEFT_NAME": "a"},
        config_file=config,
    )
    s = load(BASE_ENV, {"etcd": None, "group": {"group": "flag"}}, config)
    assert s.group.group == "flag"


def test_the_token_from_the_environment_is_taken_as_given() -> None:
    assert load(BASE_ENV | {"WEFT_SECRET": TOKEN + " "}).join_token() == (TOKEN + " ").encode()


def test_an_empty_config_file_is_all_defaults(tmp_path: Path) -> None:
    assert load(BASE_ENV, {}, write(tmp_path / "empty.yaml", "")).name == "a"


# -- settings: errors --------------------------------------------------------------------------
def expect_error(*fragments: str, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(info.value, WeftError)
    return message


def test_bad_value_names_the_field_and_the_variable() -> None:
    expect_error("lease_ttl", "WEFT_LEASE_TTL", "'soon'", env=BASE_ENV | {"WEFT_LEASE_TTL": "soon"})
    expect_error("lease_ttl", "WEFT_LEASE_TTL", env=BASE_ENV | {"WEFT_LEASE_TTL": "0"})
    expect_error("http_port", "WEFT_HTTP_PORT", env=BASE_ENV | {"WEFT_HTTP_PORT": "70000"})
    expect_error("backends", "WEFT_BACKENDS", env=BASE_ENV | {"WEFT_BACKENDS": "tcp,carrier-pigeon"})
    expect_error("group.group", "WEFT_GROUP", env=BASE_ENV | {"WEFT_GROUP": "Not_A_Label"})


def test_bad_flag_is_named_as_coming_from_the_command_line() -> None:
    expect_error(
        "etcd.endpoints",
        "not http(s)://host:port",
        "command line",
        overrides={"etcd": {"endpoints": ["etcd:2379"]}},
    )
    expect_error("name", "command line", overrides={"name": "has space"})


def test_missing_required_fields_say_how_to_give_them() -> None:
    message = expect_error("name: required", "WEFT_NAME", "group", "WEFT_GROUP", env={"WEFT_SECRET": TOKEN})
    assert "secret" not in message
    expect_error("join token is needed", env={"WEFT_NAME": "a", "WEFT_GROUP": "g"})


def test_config_file_problems(tmp_path: Path) -> None:
    expect_error("cannot read", config_file=tmp_path / "missing.yaml")
    expect_error("not valid YAML", config_file=write(tmp_path / "bad.yaml", "name: [unclosed\n"))
    expect_error("not valid JSON", config_file=write(tmp_path / "bad.json", "{name: 1}"))
    expect_error("must be a mapping", config_file=write(tmp_path / "list.yaml", "- a\n- b\n"))
    unknown = write(tmp_path / "unknown.yaml", "lease_tll: 3\n")
    expect_error("lease_tll", "Extra inputs are not permitted", str(unknown), config_file=unknown)
    nested = write(tmp_path / "nested.yaml", "etcd: {endpoint: 'http://x:1'}\n")
    expect_error("etcd.endpoint", str(nested), config_file=nested)
    big = write(tmp_path / "big.yaml", "#" * (agent_settings.MAX_CONFIG_FILE_BYTES + 1))
    expect_error("larger than", config_file=big)


def test_the_token_itself_is_refused_in_a_config_file(tmp_path: Path) -> None:
    config = write(tmp_path / "a.yaml", f"secret: {TOKEN}\n")
    message = expect_error("secret: not allowed in a config file", "secret_file", config_file=config)
    assert TOKEN not in message


def test_secrets_are_never_echoed() -> None:
    message = expect_error(
        "secret", "at least 16 bytes", "WEFT_SECRET", env=BASE_ENV | {"WEFT_SECRET": "hunter2"}
    )
    assert "hunter2" not in message
    env = BASE_ENV | {"WEFT_ETCD_PASSWORD": "p4ssw0rd-xyz"}
    message = expect_error("username and password go together", env=env)
    assert "p4ssw0rd-xyz" not in message


def test_token_file_problems(tmp_path: Path) -> None:
    env = {"WEFT_NAME": "a", "WEFT_GROUP": "g"}
    expect_error("secret_file", "cannot read", env=env | {"WEFT_SECRET_FILE": str(tmp_path / "nope")})
    short = write(tmp_path / "short", "tiny\n")
    expect_error("secret_file", "holds 4 bytes", env=env | {"WEFT_SECRET_FILE": str(short)})
    both = write(tmp_path / "both.yaml", f"secret_file: {short}\n")
    expect_error(
        "not both", config_file=both, env=env, overrides={"secret": TOKEN, "secret_file": str(short)}
    )


def test_a_wildcard_listen_address_needs_an_advertised_one() -> None:
    expect_error("advertise_host is needed", "0.0.0.0", env=BASE_ENV | {"WEFT_LISTEN_HOST": "0.0.0.0"})


def test_settings_are_frozen() -> None:
    s = load()
    with pytest.raises(ValueError, match="frozen"):
        s.name = "b"


# -- the HTTP endpoint ---------------------------------------------------------------------------
async def request(port: int, raw: bytes, *, read_timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), read_timeout)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


def serve(test: Callable[[agent_http.HttpServer, int], Any], **kwargs: Any) -> None:
    async def main() -> None:
        routes = {"/hello": lambda: agent_http.Response(200, b"hi\n")}

        def broken() -> agent_http.Response:
            raise RuntimeError("boom")

        routes["/broken"] = broken
        server = agent_http.HttpServer(routes, **kwargs)
        port = await server.start("127.0.0.1", 0)
        try:
            await test(server, port)
        finally:
            await server.close()

    asyncio.run(main())


def test_http_routes_methods_and_errors() -> None:
    async def check(server: agent_http.HttpServer, port: int) -> None:
        status, headers, body = await request(port, b"GET /hello?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, body) == (200, b"hi\n")
        assert headers["Content-Length"] == "3"
        assert headers["Connection"] == "close"
        status, headers, body = await request(port, b"HEAD /hello HTTP/1.1\r\n\r\n")
        assert (status, headers["Content-Length"], body) == (200, "3", b"")
        assert (await request(port, b"GET /nope HTTP/1.1\r\n\r\n"))[0] == 404
        status, headers, _ = await request(port, b"POST /hello HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert (status, headers["Allow"]) == (405, "GET, HEAD")
        assert (await request(port, b"GARBAGE\r\n\r\n"))[0] == 400
        assert (await request(port, b"GET /broken HTTP/1.1\r\n\r\n"))[0] == 500

    serve(check)


def test_http_bounds_the_request_head_in_size_and_time() -> None:
    async def check(server: agent_http.HttpServer, port: int) -> None:
        huge = b"GET /hello HTTP/1.1\r\nX-Pad: " + b"a" * 2000 + b"\r\n\r\n"
        assert (await request(port, huge))[0] == 431
        start = time.monotonic()
        assert (await request(port, b"GET /hello HTTP/1.1\r\n"))[0] == 408  # the head never ends
        assert time.monotonic() - start < 2.0
        assert (await request(port, b"GET /hello HTTP/1.1\r\n\r\n"))[0] == 200  # still serving

    serve(check, max_request_bytes=1024, read_timeout=0.2)


def test_http_close_drops_idle_clients_at_once() -> None:
    async def check(server: agent_http.HttpServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /hello")
        await writer.drain()
        await asyncio.sleep(0.05)
        start = time.monotonic()
        await server.close()
        assert time.monotonic() - start < 1.0
        assert await asyncio.wait_for(reader.read(), 2.0) == b""
        writer.close()

    serve(check, read_timeout=30.0)


# -- metrics and the status object of an unstarted membership ----------------------------------
def membership() -> Membership:
    config = MemberConfig(name="m", group=GroupRef(group="g"), secret=TOKEN.encode(), instance="i-1")
    return Membership(EtcdSettings(), config)


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    raise AssertionError(f"{name} not in the exposition")


def test_metrics_read_the_membership_on_every_scrape() -> None:
    m = membership()
    metrics = agent_metrics.AgentMetrics(m)
    text = metrics.render().decode()
    for name in ("weft_members", "weft_ready", "weft_fenced", "weft_leader", "weft_lease_ttl_seconds"):
        assert sample(text, name) == 0.0
    for key in ("peer_adds", "peer_removes", "fences", "rejoins", "ignored_records", "watch_restarts"):
        assert sample(text, f"weft_{key}_total") == 0.0
    for key in ("transfers", "transfer_bytes", "transfer_errors"):
        assert sample(text, f"weft_{key}_total") == 0.0
    assert 'weft_info{generation="0",group="g",name="m",namespace="default"} 1.0' in text
    m.counters["peer_adds"] = 3
    m.counters["watch_restarts"] = 2
    m.lease_ttl = 3
    metrics.count_transfer(100, ok=True)
    metrics.count_transfer(50, ok=False)
    text = metrics.render().decode()
    assert sample(text, "weft_peer_adds_total") == 3.0
    assert sample(text, "weft_watch_restarts_total") == 2.0
    assert sample(text, "weft_lease_ttl_seconds") == 3.0
    assert (sample(text, "weft_transfers_total"), sample(text, "weft_transfer_bytes_total")) == (2.0, 100.0)
    assert sample(text, "weft_transfer_errors_total") == 1.0
    assert "_created" not in text


def test_detections_are_observed_once_each() -> None:
    m = membership()
    metrics = agent_metrics.AgentMetrics(m)
    m.detections.append(("data-path", 0.003))
    m.detections.append(("etcd", 2.5))
    text = metrics.render().decode()
    assert sample(text, 'weft_detection_seconds_count{signal="data-path"}') == 1.0
    assert sample(text, 'weft_detection_seconds_bucket{le="0.005",signal="data-path"}') == 1.0
    assert sample(text, 'weft_detection_seconds_bucket{le="0.001",signal="data-path"}') == 0.0
    assert sample(text, 'weft_detection_seconds_sum{signal="etcd"}') == 2.5
    m.detections.append(("data-path", 0.003))  # equal to an earlier one, still a new detection
    text = metrics.render().decode()
    text = metrics.render().decode()  # and a scrape without news counts nothing twice
    assert sample(text, 'weft_detection_seconds_count{signal="data-path"}') == 2.0
    assert sample(text, 'weft_detection_seconds_bucket{le="+Inf",signal="etcd"}') == 1.0


def test_status_and_readiness_of_a_member_not_yet_joined() -> None:
    m = membership()
    assert agent_http.not_ready_reason(m) == "not joined yet"
    doc = agent_http.status(m)
    assert doc["name"] == "m" and doc["phase"] == "starting" and doc["state"] == "joining"
    assert (doc["ready"], doc["fenced"], doc["leader"], doc["members"], doc["events"]) == (
        False,
        False,
        None,
        [],
        [],
    )
    for i in range(250):
        m._emit("added", f"p{i}", i, "test")
    events = agent_http.status(m)["events"]
    assert len(events) == agent_http.STATUS_EVENTS
    assert events[-1]["name"] == "p249"
    assert set(events[0]) == {"kind", "name", "generation", "reason", "at"}
    json.dumps(agent_http.status(m))


# -- run_agent in this process ---------------------------------------------------------------------
@integration
def test_run_agent_joins_serves_and_leaves_on_stop(etcd: EtcdServer, tmp_path: Path) -> None:
    settings = load(BASE_ENV | {"WEFT_ETCD": etcd.endpoint, "WEFT_LEASE_TTL": "2"})
    ready = tmp_path / "ready.json"

    async def main() -> tuple[int, dict[str, Any], bytes]:
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run_agent(settings, ready_file=ready, stop=stop))
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert time.monotonic() < deadline, "the agent did not get ready"
            assert not task.done(), f"run_agent ended early: {task.result()}"
            await asyncio.sleep(0.02)
        info = json.loads(ready.read_text())
        _, _, body = await request(info["http_port"], b"GET /readyz HTTP/1.1\r\n\r\n")
        stop.set()
        return await asyncio.wait_for(task, 10), info, body

    rc, info, body = asyncio.run(main())
    assert rc == daemon.EXIT_OK
    assert body == b"ready\n"
    assert info["name"] == "a" and info["generation"] > 0 and info["fabric_port"] > 0
    assert not ready.exists()
    assert etcd.etcdctl("get", "--prefix", "/weft/v1/default/g/members/").strip() == ""


@integration
def test_run_agent_stops_promptly_while_waiting_for_etcd(tmp_path: Path) -> None:
    settings = load(BASE_ENV | {"WEFT_ETCD": f"http://127.0.0.1:{free_port()}"})

    async def main() -> tuple[int, float]:
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run_agent(settings, stop=stop))
        await asyncio.sleep(0.5)
        assert not task.done()
        stop.set()
        start = time.monotonic()
        rc = await asyncio.wait_for(task, 5)
        return rc, time.monotonic() - start

    rc, took = asyncio.run(main())
    assert rc == daemon.EXIT_OK
    assert took < 2.0


@integration
def test_run_agent_gives_up_after_the_join_timeout(caplog: pytest.LogCaptureFixture) -> None:
    settings = load(BASE_ENV | {"WEFT_ETCD": f"http://127.0.0.1:{free_port()}", "WEFT_JOIN_TIMEOUT": "1"})
    start = time.monotonic()
    rc = asyncio.run(asyncio.wait_for(daemon.run_agent(settings, stop=asyncio.Event()), 10))
    assert rc in (daemon.EXIT_FAILED, daemon.EXIT_ETCD_UNREACHABLE)
    assert time.monotonic() - start < 5.0
    assert "could not join" in caplog.text or "unreachable" in caplog.text
