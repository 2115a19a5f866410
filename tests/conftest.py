from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tests.peerproc import PeerProcess
from weft import Agent, AgentConfig

pytest_plugins = ["tests.etcd_fixtures", "tests.s3_fixtures", "tests.k8s_fixtures"]

SECRET = b"weft-test-secret-0123456789abcdef"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run tests/nixl last, whatever order the command line gave: its cases start the real
    NIXL's UCX in this process, and ucxx started after it (the fabric's ucx tests) crashes
    the process; the other way round both work."""
    items.sort(key=lambda item: "tests/nixl/" in item.nodeid.replace("\\", "/"))


@pytest.fixture(autouse=True)
def _quiet_open_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="weft")


@pytest.fixture
def make_agent() -> Iterator[object]:
    """Factory for in-process agents, closed after the test."""
    made: list[Agent] = []

    def factory(name: str, *backends: str, **config: object) -> Agent:
        agent = Agent(name, AgentConfig(list(backends) or ["local", "tcp"], **config))  # type: ignore[arg-type]
        made.append(agent)
        return agent

    yield factory
    for agent in made:
        agent.close()


@pytest.fixture
def make_peer() -> Iterator[object]:
    """Factory for agents in separate OS processes, stopped after the test."""
    made: list[PeerProcess] = []

    def factory(name: str = "b", **config: object) -> PeerProcess:
        peer = PeerProcess(name, **config)
        made.append(peer)
        return peer

    yield factory
    for peer in made:
        peer.close()
