"""NIXL's central metadata server (etcd), for ``nixl_agent``s started with NIXL_ETCD_ENDPOINTS.

NIXL built with etcd reads ``NIXL_ETCD_ENDPOINTS`` (and ``NIXL_ETCD_NAMESPACE``, default
``/nixl/agents``); then ``send_local_metadata()``, ``fetch_remote_metadata(name)`` and
``invalidate_local_metadata()`` without an address go through etcd, and a peer whose
metadata disappears is dropped. Here the same calls go to `weft.membership.directory`,
whose keys live under a lease this agent keeps alive (``WEFT_NIXL_ETCD_TTL`` seconds,
default 10): an agent that dies leaves the directory within that time, and every agent that
fetched it drops it then. The records are weft's signed metadata, checked by `add_peer`.

NIXL's calls return at once; so do these: each runs on this module's event-loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from weft.api.settings import EtcdSettings
from weft.membership.directory import Directory

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_NAMESPACE = "/nixl/agents"
DEFAULT_TTL = 10


def configured() -> EtcdSettings | None:
    """The etcd NIXL's environment names, or None when NIXL_ETCD_ENDPOINTS is unset.

    Raises:
        ValueError: endpoints that are not http(s)://host:port.
    """
    raw = os.environ.get("NIXL_ETCD_ENDPOINTS", "").strip()
    if not raw:
        return None
    urls = [u.strip() for u in raw.split(",") if u.strip()]
    urls = [u if "://" in u else f"http://{u}" for u in urls]
    return EtcdSettings(endpoints=urls)


class Central:
    """A `Directory` on its own event-loop thread, driven from plain threads.

    Args:
        name: the agent's name (for thread names and logs).
        etcd: where etcd is.
        admit: adds a fetched record (weft's `Agent.add_peer`); may raise.
        forget: drops a peer whose metadata disappeared.
    """

    def __init__(
        self,
        name: str,
        etcd: EtcdSettings,
        admit: Callable[[bytes], str],
        forget: Callable[[str], None],
    ) -> None:
        self.name = name
        namespace = os.environ.get("NIXL_ETCD_NAMESPACE", DEFAULT_NAMESPACE) or DEFAULT_NAMESPACE
        self.ttl = int(os.environ.get("WEFT_NIXL_ETCD_TTL", DEFAULT_TTL))
        self._admit = admit
        self._forget = forget
        self._watched: set[str] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"nixl-etcd-{name}", daemon=True)
        self._thread.start()
        self._directory: Directory = self._wait(self._make(etcd, namespace))
        self._watcher = asyncio.run_coroutine_threadsafe(self._watch(), self._loop)

    async def _make(self, etcd: EtcdSettings, namespace: str) -> Directory:
        return Directory(etcd, namespace, ttl=self.ttl)

    def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def _background(self, what: str, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)

        def report(f: Future[Any]) -> None:
            exc = f.exception()
            if exc is not None:
                log.warning("nixl agent %s: %s through etcd failed: %s", self.name, what, exc)

        fut.add_done_callback(report)
        return fut

    def publish(self, record: bytes, label: str = "") -> Future[Any]:
        """Publish this agent's record (``send_local_metadata``), in the background."""
        return self._background(
            "sendLocalMD", self._directory.publish(self.name, record, label or "metadata")
        )

    def fetch(self, agent: str, label: str = "") -> Future[Any]:
        """Fetch `agent`'s record and add it (``fetch_remote_metadata``), in the background."""
        return self._background("fetchRemoteMD", self._fetch(agent, label or "metadata"))

    async def _fetch(self, agent: str, label: str) -> None:
        record = await self._directory.fetch(agent, label)
        if record is None:
            log.warning("nixl agent %s: etcd has no metadata for %r", self.name, agent)
            return
        self._admit(record)
        self._watched.add(agent)

    def withdraw(self) -> Future[Any]:
        """Remove this agent's records (``invalidate_local_metadata``), in the background."""
        return self._background("invalidateLocalMD", self._directory.withdraw(self.name))

    async def _watch(self) -> None:
        """Drop peers whose metadata left etcd (withdrawn, or their lease lapsed): NIXL's
        watchers, by a look every third of the TTL."""
        while True:
            await asyncio.sleep(max(0.5, self.ttl / 3))
            for agent in sorted(self._watched):
                try:
                    gone = await self._directory.fetch(agent) is None
                except Exception as exc:  # etcd away: look again next time
                    log.debug("nixl agent %s: etcd look at %r failed: %s", self.name, agent, exc)
                    continue
                if gone:
                    log.info("nixl agent %s: %r left etcd; dropping it", self.name, agent)
                    self._watched.discard(agent)
                    self._forget(agent)

    def close(self) -> None:
        """Revoke this agent's lease (its records go at once), stop the thread, close the loop."""
        self._watcher.cancel()
        try:
            self._wait(self._directory.close())
        except Exception as exc:  # closing must not fail the caller's close
            log.warning("nixl agent %s: closing the etcd directory: %s", self.name, exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()  # its self-pipe sockets too
