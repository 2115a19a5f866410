"""The operator's two latencies on a real control plane (kube-apiserver 1.20 + etcd on loopback):

1. a TransferGroup applied -> all four children (ConfigMap, Service, StatefulSet, PDB) exist;
2. a new plan written to the group's etcd prefix -> the TransferGroup's status shows its epoch
   (the per-group mirror daemon: etcd watch, read, status patch).

`weft operator` runs as its own process, as in a cluster. The plans are signed records written
straight to etcd (as the group's leader would), so the second figure is the operator's part
alone, not the planner's.

    .venv/bin/python bench/operator.py [--groups 10] [--plans 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from weft.api import records, vocab
from weft.api.settings import EtcdSettings, GroupRef
from weft.membership import GroupClient
from weft.membership.keyspace import KeyKind
from weft.operator.kube import Kube
from weft.testing.controlplane import ControlPlane
from weft.testing.etcd import EtcdServer

NS = "bench"
TOKEN = b"bench-join-token-0123456789"
CHILDREN = [("v1", "ConfigMap", "{}-agent"), ("v1", "Service", "{}"), ("apps/v1", "StatefulSet", "{}")]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def apply(plane: ControlPlane, obj: dict[str, Any]) -> None:
    plane.kubectl("apply", "-f", "-", input=json.dumps(obj))


def tg(name: str, etcd: str) -> dict[str, Any]:
    return {
        "apiVersion": "weft.dev/v1alpha1",
        "kind": "TransferGroup",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"replicas": 3, "etcd": {"endpoints": [etcd], "joinTokenSecretRef": {"name": "join"}}},
    }


def children_latency(plane: ControlPlane, kube: Kube, etcd: str, groups: int) -> list[float]:
    pdb_version = kube.preferred_version("policy", "PodDisruptionBudget", ["policy/v1", "policy/v1beta1"])
    out = []
    for i in range(groups):
        name = f"g{i}"
        started = time.perf_counter()
        apply(plane, tg(name, etcd))
        wanted = [*CHILDREN, (pdb_version, "PodDisruptionBudget", "{}")]
        deadline = time.monotonic() + 60
        while wanted:
            v, kind, fmt = wanted[0]
            if kube.get(v, kind, fmt.format(name), NS) is not None:
                wanted.pop(0)
                continue
            if time.monotonic() > deadline:
                raise SystemExit(f"{kind} of {name} never appeared")
            time.sleep(0.005)
        out.append(time.perf_counter() - started)
    return out


async def plan_latency(kube: Kube, etcd_endpoint: str, plans: int) -> list[float]:
    name = "g0"
    group = GroupClient(EtcdSettings(endpoints=[etcd_endpoint]), GroupRef(namespace=NS, group=name), TOKEN)
    members = ["m0", "m1", "m2"]
    for i, m in enumerate(members):
        rec = records.MemberRecord(
            name=m, generation=i + 1, instance=f"i{i}", incarnation=0, node="bench",
            state=vocab.MemberState.ACTIVE, capabilities=records.Capabilities(), fabric="",
            lease_ttl=3.0, joined_at=time.time(),
        )  # fmt: skip
        await group.put_record(KeyKind.MEMBER, rec, m)
    out = []
    for epoch in range(1, plans + 1):
        roles = {
            m: (vocab.Role.PREFILL if (j + epoch) % 3 == 0 else vocab.Role.DECODE)
            for j, m in enumerate(members)
        }
        plan = records.PlanRecord(
            epoch=epoch,
            members=members,
            roles=roles,
            leader="m0",
            leader_generation=1,
            written_at=time.time(),
        )
        started = time.perf_counter()
        await group.put_record(KeyKind.PLAN, plan)
        deadline = time.monotonic() + 30
        while True:
            st = (kube.get("weft.dev/v1alpha1", "TransferGroup", name, NS) or {}).get("status") or {}
            if st.get("planEpoch") == epoch:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"epoch {epoch} never reached the status")
            await asyncio.sleep(0.005)
        out.append(time.perf_counter() - started)
        await asyncio.sleep(0.3)  # let the rate limit (0.25 s) pass: each plan measured alone
    await group.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=10)
    ap.add_argument("--plans", type=int, default=20)
    args = ap.parse_args()
    run = Path(tempfile.mkdtemp(prefix="weft-bench-operator-"))
    with ControlPlane(run / "k8s") as plane, EtcdServer(run / "etcd") as etcd:
        plane.kubectl(
            "apply", "-f", str(Path(__file__).resolve().parent.parent / "crds" / "transfergroup.yaml")
        )
        plane.kubectl("wait", "--for", "condition=established", "crd/transfergroups.weft.dev")
        plane.kubectl("create", "namespace", NS)
        plane.kubectl(
            "-n", NS, "create", "secret", "generic", "join", f"--from-literal=token={TOKEN.decode()}"
        )
        env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig)}
        with (run / "operator.log").open("wb") as log:
            op = subprocess.Popen(
                [sys.executable, "-m", "weft.cli", "operator", "-n", NS, "--standalone"],
                stdout=log,
                stderr=log,
                env=env,
            )
        try:
            time.sleep(3)  # the operator's start (kopf, discovery, watches)
            kube = Kube(plane.kubeconfig)
            applied = children_latency(plane, kube, etcd.endpoint, args.groups)
            mirrored = asyncio.run(plan_latency(kube, etcd.endpoint, args.plans))
        finally:
            op.kill()
            op.wait(10)
    print("| measure | n | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for label, xs in (("TransferGroup applied -> 4 children exist", applied),
                      ("plan written to etcd -> status shows its epoch", mirrored)):  # fmt: skip
        p50, p99, top = statistics.median(xs) * 1e3, pct(xs, 0.99) * 1e3, max(xs) * 1e3
        print(f"| {label} | {len(xs)} | {p50:.0f} | {p99:.0f} | {top:.0f} |")


if __name__ == "__main__":
    main()
