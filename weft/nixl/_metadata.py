"""The peer half of ``nixl_agent``: notifications, metadata, remote agents.

Metadata is weft's signed record. It travels by hand (``get_agent_metadata`` /
``add_remote_agent``), over NIXL-style sockets (`weft.nixl._exchange`), or through etcd
(`weft.nixl._central`) when ``NIXL_ETCD_ENDPOINTS`` is set, as with NIXL.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING

from weft import fabric
from weft.fabric import Agent
from weft.nixl import _bindings as nixlBind
from weft.nixl import _convert
from weft.nixl._exchange import Exchange, invalidation
from weft.nixl._memory import _SEG, _Table

if TYPE_CHECKING:
    from weft.nixl._central import Central

logger = logging.getLogger("weft.nixl._api")

DEFAULT_COMM_PORT = nixlBind.DEFAULT_COMM_PORT


class Metadata:
    """Notifications and metadata exchange of a ``nixl_agent``."""

    agent: Agent
    name: str
    notifs: dict[str, list[bytes]]
    _remote: dict[str, tuple[int, _Table]]
    _loop_notifs: list[bytes]
    _lock: threading.RLock
    _exchange: Exchange
    _etcd: Central | None

    def _peer_name(self, agent_name: str | bytes) -> str:
        return agent_name.decode() if isinstance(agent_name, bytes) else str(agent_name)

    def _remote_table(self, peer: str, refresh: bool = False) -> _Table:
        """The peer's regions by address, rebuilt when its metadata changed."""
        try:
            if refresh:
                self.agent.refresh_peer(peer)
            p = self.agent.backend_host.peer(peer)
        except fabric.WeftError as exc:
            raise _convert.nixl_error(exc) from exc
        md = p.md
        cached = self._remote.get(peer)
        if cached is not None and cached[0] == id(md):
            return cached[1]
        table = _Table()
        for r in md.regions:
            seg = _SEG.get(fabric.MemoryKind(r.kind))
            if seg is not None:
                table.add(seg, 0, int(r.addr), int(r.size), int(r.id))
        self._remote[peer] = (id(md), table)
        return table

    def _start_central(self) -> Central | None:
        """The etcd directory when NIXL_ETCD_ENDPOINTS names one (imported only then)."""
        from weft.nixl import _central

        try:
            etcd = _central.configured()
        except ValueError as exc:
            raise nixlBind.nixlInvalidParamError(f"NIXL_ETCD_ENDPOINTS: {exc}") from exc
        if etcd is None:
            return None
        return _central.Central(self.name, etcd, self.agent.add_peer, self._forget)

    def _forget(self, name: str) -> None:
        with contextlib.suppress(fabric.UnknownPeerError):
            self.agent.remove_peer(name)

    # -- notifications ----------------------------------------------------------------------
    def _send_bytes(self, peer: str, msg: bytes) -> None:
        if peer == self.name:
            with self._lock:
                self._loop_notifs.append(msg)
            return
        self.agent.send_notification(peer, msg)

    def get_new_notifs(self, backends: list[str] = []) -> dict[str, list[bytes]]:  # noqa: B006
        """New notifications, {agent name (str): [bytes]}."""
        out = self.agent.get_notifications()
        if self._loop_notifs:
            with self._lock:
                mine, self._loop_notifs = self._loop_notifs, []
            out.setdefault(self.name, []).extend(mine)
        return out

    def update_notifs(self, backends: list[str] = []) -> dict[str, list[bytes]]:  # noqa: B006
        """Add new notifications to ``self.notifs`` and return it."""
        for name, msgs in self.get_new_notifs().items():
            self.notifs.setdefault(name, []).extend(msgs)
        return self.notifs

    def check_remote_xfer_done(
        self,
        remote_agent_name: str,
        lookup_tag: bytes,
        backends: list[str] = [],  # noqa: B006
        tag_is_prefix: bool = True,
    ) -> bool:
        """Take the first notification of that agent matching `lookup_tag` (prefix or substring)."""
        self.update_notifs()
        msgs = self.notifs.get(remote_agent_name, [])
        for msg in msgs:
            if (tag_is_prefix and msg.startswith(lookup_tag)) or (not tag_is_prefix and lookup_tag in msg):
                msgs.remove(msg)
                return True
        return False

    def send_notif(
        self, remote_agent_name: str | bytes, notif_msg: bytes | str, backend: str | None = None
    ) -> None:
        """A notification alone.

        Raises:
            nixlNotFoundError: an unknown agent (as NIXL).
        """
        try:
            self._send_bytes(self._peer_name(remote_agent_name), _convert.text_bytes(notif_msg))
        except fabric.WeftError as exc:
            raise _convert.nixl_error(exc) from exc

    # -- metadata ---------------------------------------------------------------------------
    def get_agent_metadata(self) -> bytes:
        """weft's signed metadata record (all registered regions and endpoints)."""
        return self.agent.metadata()

    def get_partial_agent_metadata(
        self,
        descs: nixlBind.nixlRegDList,
        inc_conn_info: bool = False,
        backends: list[str] = [],  # noqa: B006
    ) -> bytes:
        """The full metadata: weft's record is not split (a superset of what was asked)."""
        return self.agent.metadata()

    def add_remote_agent(self, metadata: bytes) -> bytes:
        """Add a peer. Returns its name as **bytes**, as NIXL's binding does (clients pass it
        back to ``prep_xfer_dlist``, which takes bytes or str).

        Raises:
            nixlMismatchError: not metadata. nixlNotAllowedError: not signed with the group
            secret, or an older generation.
        """
        try:
            return self.agent.add_peer(bytes(metadata)).encode()
        except fabric.StalePeerError as exc:
            raise nixlBind.nixlNotAllowedError(str(exc)) from exc
        except fabric.WeftError as exc:
            raise _convert.nixl_error(exc) from exc

    def remove_remote_agent(self, agent: str | bytes) -> None:
        """Forget a peer (its transfers in flight fail). An unknown name is ignored, as NIXL."""
        self._forget(self._peer_name(agent))

    def check_remote_metadata(self, agent: str | bytes, descs: nixlBind.nixlXferDList | None = None) -> bool:
        """True when the peer is known and alive (and, with `descs`, holds all of them)."""
        name = self._peer_name(agent)
        try:
            if not self.agent.peer_alive(name):
                return False
            if descs is None or descs.isEmpty():
                return True
            table = self._remote_table(name)
        except (fabric.WeftError, nixlBind.nixlError):
            return False
        seg = descs.getType()
        return all(table.find(seg, 0, a, n) is not None for a, n, _ in descs.descs())

    def _central(self, what: str) -> Central:
        """The etcd directory, or nixlNotSupportedError naming how to get one."""
        if self._etcd is None:
            raise nixlBind.nixlNotSupportedError(
                f"{what}: no central metadata server: set NIXL_ETCD_ENDPOINTS (etcd), "
                "or give ip_addr and port (a peer's listener)"
            )
        return self._etcd

    def send_local_metadata(self, ip_addr: str = "", port: int = DEFAULT_COMM_PORT) -> None:
        """Publish this agent's metadata to etcd (no ``ip_addr``) or push it to a peer's
        listener; in the background, as NIXL."""
        if not ip_addr:
            self._central("sendLocalMD").publish(self.agent.metadata())
            return
        md = self.agent.metadata()
        self._exchange.submit(lambda: self._exchange.push(ip_addr, port, md))

    def send_partial_agent_metadata(
        self,
        descs: nixlBind.nixlRegDList,
        inc_conn_info: bool = False,
        backends: list[str] = [],  # noqa: B006
        ip_addr: str = "",
        port: int = DEFAULT_COMM_PORT,
        label: str = "",
    ) -> None:
        """As `send_local_metadata`, under `label` in etcd (weft's record is not split: the
        whole signed record goes, which holds what any part would)."""
        if not ip_addr:
            self._central("sendLocalPartialMD").publish(self.agent.metadata(), label)
            return
        self.send_local_metadata(ip_addr, port)

    def fetch_remote_metadata(
        self, remote_agent: str, ip_addr: str = "", port: int = DEFAULT_COMM_PORT, label: str = ""
    ) -> None:
        """Fetch a peer's metadata from etcd (no ``ip_addr``) or from its listener, in the
        background (poll ``check_remote_metadata``)."""
        name = self._peer_name(remote_agent)
        if not ip_addr:
            self._central("fetchRemoteMD").fetch(name, label)
            return
        self._exchange.submit(lambda: self._exchange.fetch(ip_addr, port, name))

    def invalidate_local_metadata(self, ip_addr: str = "", port: int = DEFAULT_COMM_PORT) -> None:
        """Withdraw this agent's metadata from etcd (no ``ip_addr``), or tell a peer's listener
        to forget this agent (authenticated with the group secret)."""
        if not ip_addr:
            self._central("invalidateLocalMD").withdraw()
            return
        payload = invalidation(self.agent.config.secret, self.name)
        self._exchange.submit(lambda: self._exchange.push(ip_addr, port, payload, b"I"))
