"""Sidecar mode: the `weft agent` daemon next to an engine that does not import weft.

The engine and the agent share the pod (its network namespace, its IPC namespace and a
memory-backed ``emptyDir``), so the agent reaches the engine on loopback:

* **Load.** Every `SCRAPE_INTERVAL` it reads the engine's own Prometheus endpoint
  (``engine_metrics_url``; vLLM's and SGLang's metric names, see
  `weft.engine.metrics.EngineScrape`) and publishes the figures as this member's load, so
  the role policy and the autoscaler see the engine's real queue and latencies.
* **Handshakes.** With ``engine_hook_url`` set, each role switch and drain is POSTed to it as
  JSON ``{"change": "role"|"drain", "epoch", "old", "new", "why", "deadline_seconds"}``; the
  engine answers 2xx once it has switched (it may hold the request open until then), and only
  then does the agent publish the role and ack. Anything else fails the change (retried a
  second later). Without a hook the agent acks once its own transfers are done.

An engine that stops answering is said so once (a warning, the ``weft_engine_scrape_errors``
counter in /status), not on every scrape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any

from weft.engine import Change, DrainRequest, Engine, RoleChange
from weft.engine.metrics import EngineScrape

log = logging.getLogger(__name__)

SCRAPE_INTERVAL = 1.0
SCRAPE_TIMEOUT = 2.0
MAX_SCRAPE_BYTES = 8 << 20
_HOOK_SLACK = 5.0  # seconds beyond the change's deadline the hook's HTTP call may take


class Sidecar:
    """Links a daemon's `Engine` to the engine process next to it.

    Args:
        engine: the daemon's engine SDK object.
        metrics_url: the engine's Prometheus endpoint, or None.
        hook_url: where to POST changes, or None.
    """

    def __init__(self, engine: Engine, metrics_url: str | None, hook_url: str | None) -> None:
        self.engine = engine
        self.metrics_url = metrics_url
        self.hook_url = hook_url
        self.scrape_errors = 0
        self._scrape = EngineScrape()
        self._failing = False
        if hook_url is not None:
            engine.on_role_change(self._post)
            engine.on_drain(self._post)

    async def run(self) -> None:
        """Scrape until cancelled."""
        if self.metrics_url is None:
            return
        while True:
            await self.scrape_once()
            await asyncio.sleep(SCRAPE_INTERVAL)

    async def scrape_once(self) -> bool:
        """Read the engine's metrics once into the engine's load; False when that failed."""
        assert self.metrics_url is not None
        try:
            text = await asyncio.to_thread(_get, self.metrics_url)
            figures = self._scrape.read(text, time.monotonic())
        except (OSError, ValueError, urllib.error.URLError) as exc:
            self.scrape_errors += 1
            if not self._failing:
                log.warning(
                    "%s: cannot read the engine's metrics at %s: %s", self.engine.name, self.metrics_url, exc
                )
            self._failing = True
            return False
        if self._failing:
            log.info("%s: reading the engine's metrics again", self.engine.name)
        self._failing = False
        load = self.engine.load
        load.set(
            queue_depth=figures.get("queue_depth"),
            running=figures.get("running"),
            kv_cache_usage=figures.get("kv_cache_usage"),
        )
        load.set_latencies(figures.get("ttft"), figures.get("itl"), figures.get("tokens_per_s"))
        return True

    async def _post(self, change: Change) -> None:
        """Tell the engine; raising fails the change (the SDK asks again)."""
        assert self.hook_url is not None
        body: dict[str, Any] = {
            "change": "role" if isinstance(change, RoleChange) else "drain",
            "epoch": change.epoch,
            "deadline_seconds": round(max(change.seconds_left, 0.0), 3),
        }
        if isinstance(change, RoleChange):
            body |= {"old": change.old, "new": change.new}
        if isinstance(change, DrainRequest):
            body["why"] = change.why
        timeout = max(change.seconds_left, 0.0) + _HOOK_SLACK
        status, text = await asyncio.to_thread(_post, self.hook_url, json.dumps(body).encode(), timeout)
        if not 200 <= status < 300:
            raise RuntimeError(f"the engine's hook answered {status}: {text[:200]}")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as r:
        data: bytes = r.read(MAX_SCRAPE_BYTES)
        return data.decode("utf-8", "replace")


def _post(url: str, body: bytes, timeout: float) -> tuple[int, str]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read(4096).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(4096).decode("utf-8", "replace")
