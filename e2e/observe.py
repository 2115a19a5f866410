"""The group as etcd has it, read from outside the cluster four times a second, and the plan
invariants checked on every read.

Plan invariants: epochs only grow, and there is never a second plan for an epoch. Reads
alone could miss a plan written and replaced between two reads, so the check also uses the
plan key's etcd ``version`` (one more per write): between two reads the epoch must have
grown by at least as many writes as happened, which catches a rewrite of an epoch even when
it was never seen.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from weft.api import records
from weft.api.metadata import decode_metadata
from weft.api.settings import EtcdSettings
from weft.membership._etcd import Etcd
from weft.membership.keyspace import KeyKind, Keyspace

POLL_SECONDS = 0.25


@dataclass(frozen=True)
class Member:
    name: str
    generation: int
    process: str  # the agent process (boot id, pid namespace, pid, KV pool address): its memory's owner
    fabric: bytes  # metadata for `Agent.add_peer`
    role: str | None
    gpus: int


@dataclass(frozen=True)
class Plan:
    epoch: int
    roles: dict[str, str]
    experts: dict[str, list[str]]
    under_replicated: list[int]


@dataclass
class View:
    at: float = 0.0
    etcd_ok: bool = False
    members: dict[str, Member] = field(default_factory=dict)
    plan: Plan | None = None
    acks: dict[str, int] = field(default_factory=dict)


class Observer(threading.Thread):
    """Polls the group's keys; `view` is the latest read (etcd_ok false while etcd is away)."""

    def __init__(
        self, etcd: str, namespace: str, group: str, token: bytes, tls: Mapping[str, Path] | None = None
    ) -> None:
        """`tls`: the client certificate's files as `EtcdSettings` fields (ca_file, cert_file,
        key_file), for an etcd that speaks TLS and wants client certificates."""
        super().__init__(name="observer", daemon=True)
        files = dict(tls or {})
        self.settings = EtcdSettings(
            endpoints=[etcd],
            request_timeout=1.0,
            ca_file=files.get("ca_file"),
            cert_file=files.get("cert_file"),
            key_file=files.get("key_file"),
        )
        self.keyspace = Keyspace(namespace, group)
        self.token = token
        self.view = View()
        self.plan_checks = 0
        self.violations: list[str] = []
        self._last_plan: tuple[int, int] | None = None  # (epoch, version)
        self._seen: dict[int, str] = {}  # epoch -> plan digest
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def snapshot(self) -> View:
        with self._lock:
            return self.view

    def run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        etcd = Etcd(self.settings)
        try:
            while not self._halt.is_set():
                started = time.monotonic()
                try:
                    view = await self._read(etcd)
                except Exception:
                    view = View(at=time.time(), etcd_ok=False, members=self.view.members, plan=self.view.plan)
                with self._lock:
                    self.view = view
                await asyncio.sleep(max(0.0, POLL_SECONDS - (time.monotonic() - started)))
        finally:
            await etcd.close()

    async def _read(self, etcd: Etcd) -> View:
        _, kvs = await etcd.get_prefix(self.keyspace.prefix.encode())
        view = View(at=time.time(), etcd_ok=True)
        for kv in kvs:
            key = kv.key.decode()
            parsed = self.keyspace.parse(key)
            kind = parsed.kind if parsed is not None else None
            try:
                if kind is KeyKind.MEMBER:
                    m = records.unseal(records.MemberRecord, kv.value, key, self.token)
                    md = decode_metadata(m.fabric_metadata(), self.token)
                    # the kernel reuses pid-namespace numbers, and a container's main process is
                    # pid 1: the address of the KV pool (ASLR) tells a restarted process apart
                    pool = next((r.addr for r in md.regions if r.name == "kv-pool"), 0)
                    process = f"{md.host.boot_id}/{md.host.pid_ns}/{md.host.pid}/{pool:x}"
                    view.members[m.name] = Member(
                        m.name, m.generation, process, m.fabric_metadata(), m.role, m.capabilities.gpus
                    )
                elif kind is KeyKind.PLAN:
                    p = records.unseal(records.PlanRecord, kv.value, key, self.token)
                    view.plan = Plan(p.epoch, dict(p.roles), dict(p.experts), list(p.under_replicated))
                    self._check_plan(p.epoch, kv.version, p.model_dump_json(exclude={"written_at"}))
                elif kind is KeyKind.ACK:
                    a = records.unseal(records.AckRecord, kv.value, key, self.token)
                    view.acks[a.name] = a.epoch
            except records.RecordError as exc:
                self.violations.append(f"{key}: a record that does not verify: {exc}")
        return view

    def _check_plan(self, epoch: int, version: int, body: str) -> None:
        self.plan_checks += 1
        digest = hashlib.sha256(body.encode()).hexdigest()
        if self._seen.setdefault(epoch, digest) != digest:
            self.violations.append(f"two different plans for epoch {epoch}")
        if self._last_plan is not None:
            last_epoch, last_version = self._last_plan
            if version < last_version or epoch < last_epoch:
                self.violations.append(
                    f"plan went back: epoch {last_epoch}->{epoch}, version {last_version}->{version}"
                )
            elif epoch - last_epoch < version - last_version:
                self.violations.append(
                    f"{version - last_version} plan writes but the epoch grew by {epoch - last_epoch} "
                    f"({last_epoch}->{epoch}): an epoch was written twice"
                )
        self._last_plan = (epoch, version)


def expert_gaps(view: View) -> list[int]:
    """Experts of the plan with no live replica that the plan does not report
    under-replicated."""
    if view.plan is None:
        return []
    live = set(view.members)
    reported = set(view.plan.under_replicated)
    return sorted(
        int(e)
        for e, holders in view.plan.experts.items()
        if not (set(holders) & live) and int(e) not in reported
    )


def healthy(view: View, replicas: int) -> bool:
    """`replicas` members, a plan naming exactly them, acked by every one of them."""
    if not view.etcd_ok or len(view.members) != replicas or view.plan is None:
        return False
    if set(view.plan.roles) != set(view.members):
        return False
    return all(view.acks.get(name) == view.plan.epoch for name in view.members)
