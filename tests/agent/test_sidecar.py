"""Sidecar mode: `weft agent` next to an engine that does not import weft (a real process
each, the stand-in engine of `weft.testing.fakeengine`, a real etcd)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent.test_cli import AgentProcess, get, wait_for
from weft.engine.metrics import EngineScrape
from weft.testing import fakeengine

VLLM = """# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{model_name="a"}} {waiting}
vllm:num_requests_waiting{{model_name="b"}} 1
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{model_name="a"}} 2
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{{model_name="a"}} 1.7
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{le="0.1",model_name="a"}} {fast}
vllm:time_to_first_token_seconds_bucket{{le="1.0",model_name="a"}} {slow}
vllm:time_to_first_token_seconds_bucket{{le="+Inf",model_name="a"}} {slow}
vllm:time_to_first_token_seconds_count{{model_name="a"}} {slow}
vllm:time_to_first_token_seconds_sum{{model_name="a"}} 0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{{model_name="a"}} {tokens}
"""


def test_engine_metrics_read_as_load_with_recent_percentiles() -> None:
    scrape = EngineScrape()
    first = scrape.read(VLLM.format(waiting=5, fast=10, slow=10, tokens=100), now=0.0)
    assert (first["queue_depth"], first["running"], first["kv_cache_usage"]) == (6, 2, 1.0)  # summed, clamped
    assert first["ttft"].p50 == pytest.approx(50.0)  # 10 requests, all under 100 ms
    assert "tokens_per_s" not in first  # a rate needs two scrapes
    # since then: 10 more requests, all between 100 ms and 1 s; 200 tokens in 2 s
    second = scrape.read(VLLM.format(waiting=0, fast=10, slow=20, tokens=300), now=2.0)
    assert 100.0 < second["ttft"].p50 <= 1000.0  # the old fast ones no longer count
    assert second["tokens_per_s"] == pytest.approx(100.0)
    third = scrape.read(VLLM.format(waiting=0, fast=10, slow=20, tokens=300), now=3.0)
    assert third["ttft"] is None  # nothing finished since the last scrape
    with pytest.raises(ValueError):
        scrape.read("this is { not prometheus", now=4.0)


def post(url: str, doc: dict[str, Any]) -> None:
    req = urllib.request.Request(url, json.dumps(doc).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200


def engine_state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/state", timeout=5) as r:
        state: dict[str, Any] = json.loads(r.read())
        return state


@pytest.fixture
def fake_engine() -> Iterator[str]:
    server = fakeengine.serve()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()
    server.server_close()


@pytest.mark.integration
def test_the_sidecar_publishes_the_engine_s_load_and_acks_after_its_hook(
    start_agent: Callable[..., AgentProcess], fake_engine: str, tmp_path: Path
) -> None:
    post(fake_engine + "/hook", {"status": 503})  # the engine is not ready to switch yet
    post(fake_engine + "/load", {"waiting": 12, "running": 3, "kv": 0.4, "ttft_ms": 800})
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"engine_metrics_url: {fake_engine}/metrics\nengine_hook_url: {fake_engine}/weft\n")
    a = start_agent("side", "--config", str(config))
    state = wait_for("the hook to be asked", lambda: engine_state(fake_engine)["changes"] or None, 15.0)
    assert state[0]["change"] == "role" and state[0]["answered"] == 503
    assert a.status()["applied_epoch"] == 0  # the engine refused: no ack
    post(fake_engine + "/hook", {"status": 200})
    wait_for("the ack once the engine switched", lambda: a.status()["applied_epoch"] > 0, 15.0)
    assert engine_state(fake_engine)["role"] == a.status()["role"]

    def load_in_metrics() -> str | None:
        text = get(a.http_port, "/metrics")[2].decode()
        return text if "weft_engine_queue_depth 12.0" in text else None

    text = wait_for("the engine's load on the agent's /metrics", load_in_metrics, 15.0)
    assert "weft_engine_running 3.0" in text and "weft_engine_kv_cache_usage 0.4" in text
    assert 'weft_engine_ttft_ms{quantile="0.9"}' in text
