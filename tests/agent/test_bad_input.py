"""`weft agent` given bad input or starved of resources: one clear line and the documented
exit status, never a traceback, a hang, or a log line per retry."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from weft import cli
from weft.agent import daemon
from weft.api import agent_settings
from weft.api.agent_settings import AgentSettings
from weft.fabric.errors import ConfigError

TOKEN = "weft-bad-input-test-token-0123456789"
BASE = ["--etcd", "http://127.0.0.1:1", "--group", "g", "--name", "a"]


def weft(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEFT_")} | {"WEFT_SECRET": TOKEN}
    return subprocess.run(
        [sys.executable, "-m", "weft.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


# -- the command line ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [["agent", "--no-such-flag"], [], ["nope"], ["operator"], ["status", "--json", "extra"]],
)
def test_usage_errors_exit_with_the_config_error_status_not_etcd_unreachable(argv: list[str]) -> None:
    done = weft(*argv)
    assert done.returncode == cli.EXIT_FAILED != cli.EXIT_ETCD_UNREACHABLE
    assert one_line(done).startswith("weft")
    assert "--help" in done.stderr


def test_help_still_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["agent", "--help"])
    assert exited.value.code == 0
    assert "--kv-pool-bytes" in capsys.readouterr().out


def test_a_kv_pool_larger_than_the_memory_available_is_refused_before_starting() -> None:
    done = weft("agent", *BASE, "--kv-pool-bytes", str(1 << 40))
    assert done.returncode == cli.EXIT_FAILED
    line = one_line(done)
    assert line.startswith("weft agent: kv_pool_bytes: 1099511627776 bytes") and "available" in line


def test_an_expert_source_that_does_not_exist_is_refused_at_start(tmp_path: Path) -> None:
    for source, named in (
        ("kv:/nonexistent/lmcache.yaml", "kv:/nonexistent/lmcache.yaml"),
        (f"dir:{tmp_path / 'none'}", "not a directory"),
    ):
        done = weft("agent", *BASE, "--experts", "4", "--expert-source", source)
        assert done.returncode == cli.EXIT_FAILED
        line = one_line(done)
        assert line.startswith("weft agent: expert source") and named in line


def test_a_yaml_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path: Path) -> None:
    rows = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        rows.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(rows) + "\n")
    assert bomb.stat().st_size < 400
    started = time.monotonic()
    done = weft("agent", "--config", str(bomb), *BASE)
    assert done.returncode == cli.EXIT_FAILED
    line = one_line(done)
    assert "expands to more than" in line and len(line) < 300
    assert time.monotonic() - started < 30  # a process start; the bomb itself took minutes


# -- the settings, in this process ---------------------------------------------------------------
def test_yaml_aliases_within_the_bound_still_work_and_loops_are_refused() -> None:
    assert agent_settings.parse_yaml("a: &x [1, 2]\nb: *x\n") == {"a": [1, 2], "b": [1, 2]}
    with pytest.raises(ValueError, match="contains it"):
        agent_settings.parse_yaml("a: &x [*x]\n")
    with pytest.raises(ValueError, match="nested too deeply"):
        agent_settings.parse_yaml("a: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(ValueError, match="more than 10 nodes"):
        agent_settings.parse_yaml("a: &x [1, 2, 3]\nb: [*x, *x, *x]\n", max_nodes=10)


def test_a_bad_value_is_quoted_from_a_bounded_walk(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("name: " + "[" * 50 + "'" + "x" * 100_000 + "'" + "]" * 50 + "\n")
    with pytest.raises(ConfigError) as raised:
        agent_settings.resolve_settings(
            AgentSettings, config_file=config, env={"WEFT_GROUP": "g", "WEFT_SECRET": TOKEN}
        )
    assert "name:" in str(raised.value) and len(str(raised.value)) < 600


def _settings(**fields: object) -> AgentSettings:
    return AgentSettings.model_validate({"name": "a", "group": {"group": "g"}, "secret": TOKEN} | fields)


def test_preflight_reads_meminfo_and_the_cgroup_limit(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 8000000 kB\nMemAvailable: 4000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("max\n")
    assert daemon.available_memory(meminfo, cgroup) == (4_096_000_000, f"MemAvailable in {meminfo}")
    daemon.preflight(_settings(kv_pool_bytes=4_000_000_000), meminfo, cgroup)
    with pytest.raises(ConfigError, match="MemAvailable"):
        daemon.preflight(_settings(kv_pool_bytes=5_000_000_000), meminfo, cgroup)
    (cgroup / "memory.max").write_text("3000000000\n")
    (cgroup / "memory.current").write_text("1000000000\n")
    with pytest.raises(ConfigError, match="cgroup limit"):
        daemon.preflight(_settings(kv_pool_bytes=2_500_000_000), meminfo, cgroup)
    daemon.preflight(_settings(kv_pool_bytes=1_500_000_000), meminfo, cgroup)


# -- the HTTP port out of descriptors --------------------------------------------------------------
_STARVED_SERVER = textwrap.dedent(
    """
    import asyncio, logging, os, resource, sys
    from weft.engine import http
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")

    async def main():
        server = http.HttpServer({"/x": lambda: http.Response(200, b"x\\n")})
        port = await server.start("127.0.0.1", 0)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        held = []
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        print(port, flush=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while server.accept_errors < 3 and loop.time() < deadline:  # clients connect meanwhile
            await asyncio.sleep(0.01)
        print(server.accept_errors, flush=True)
        for fd in held:
            os.close(fd)
        await loop.run_in_executor(None, sys.stdin.readline)  # "quit": served meanwhile
        await server.close()

    asyncio.run(main())
    """
)


def test_the_http_port_backs_off_when_descriptors_run_out_and_says_so_once() -> None:
    import socket

    with subprocess.Popen(
        [sys.executable, "-c", _STARVED_SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            port = int(proc.stdout.readline())
            clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
            for c in clients:
                c.sendall(b"GET /x HTTP/1.1\r\n\r\n")
            errors = int(proc.stdout.readline())  # once it failed 3 times in a row, it frees them
            for c in clients:  # once descriptors are back, every waiting client is answered
                with c:
                    assert c.recv(64).startswith(b"HTTP/1.1 200 ")
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            assert proc.wait(30) == 0
            log = proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert errors >= 2  # it did run out, more than once in a row
    assert log.count("ERROR") == 1, log
    assert log.count("cannot accept connections") == 1 and log.count("accepts connections again") == 1
