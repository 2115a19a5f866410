"""The autoscaling step (`weft.operator.scaling.Autoscaler.step`) against the real
kube-apiserver and a real etcd: members' signed load records in, ``spec.replicas`` out
through the scale subresource.

The step is driven directly (no kopf), so each decision is one call and each wait is a
loop of calls with a deadline derived from the stabilization window. The CRD served here is
crds/transfergroup.yaml with the ``spec.autoscaling`` schema added from its model, so the
API server itself validates the section (and prunes nothing of it).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent.test_cli import TOKEN, wait_for
from tests.k8s_fixtures import CRD_FILE
from tests.operator.test_operator import Operator, condition
from weft.api import records, transfergroup, vocab
from weft.api.autoscaling import Autoscaling
from weft.api.settings import EtcdSettings, GroupRef
from weft.membership import GroupClient
from weft.membership.keyspace import KeyKind
from weft.operator import groupclients, handlers, scaling
from weft.operator.kube import Kube
from weft.testing.controlplane import ControlPlane
from weft.testing.etcd import EtcdServer

pytestmark = pytest.mark.integration
NS = "weft-autoscale"
API = f"{transfergroup.GROUP}/{transfergroup.VERSION}"
DOWN_WINDOW = 1  # seconds: short, so the test waits on it for real


def autoscaling_crd() -> dict[str, Any]:
    """The TransferGroup CRD with ``spec.autoscaling`` and the Scaling condition type (what
    `weft crds` makes once `TransferGroupSpec` and `ConditionType` have them)."""
    manifest = transfergroup.crd_manifest()
    root = manifest["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    section = transfergroup._structural(Autoscaling.model_json_schema(by_alias=True))
    root["properties"]["spec"]["properties"].setdefault("autoscaling", section | {"nullable": True})
    types = root["properties"]["status"]["properties"]["conditions"]["items"]["properties"]["type"]["enum"]
    if scaling.CONDITION not in types:
        types.append(scaling.CONDITION)
    return manifest


@pytest.fixture(scope="module")
def plane(tg_crd: ControlPlane) -> Iterator[ControlPlane]:
    tg_crd.kubectl("apply", "-f", "-", input=json.dumps(autoscaling_crd()))
    tg_crd.kubectl("wait", "--for", "condition=established", "--timeout=60s", "crd/transfergroups.weft.dev")
    # kubectl validates against the OpenAPI the server publishes, a moment after the CRD changes
    wait_for(
        "spec.autoscaling in the published OpenAPI",
        lambda: tg_crd.kubectl("explain", "tg.spec.autoscaling", check=False).startswith("KIND:"),
        60,
        interval=0.2,
    )
    tg_crd.kubectl("create", "namespace", NS, check=False)
    tg_crd.kubectl(
        "-n", NS, "create", "secret", "generic", "join", f"--from-literal=token={TOKEN}", check=False
    )
    yield tg_crd
    tg_crd.kubectl("-n", NS, "delete", "tg", "--all", "--wait=false", check=False)
    tg_crd.kubectl("apply", "-f", str(CRD_FILE))  # the CRD as the other tests know it


def spec_of(plane: ControlPlane, name: str) -> dict[str, Any]:
    return dict(json.loads(plane.kubectl("-n", NS, "get", "tg", name, "-o", "json"))["spec"])


def member(name: str) -> records.MemberRecord:
    return records.MemberRecord(
        name=name,
        generation=1,
        instance="i1",
        incarnation=0,
        node="n",
        state=vocab.MemberState.ACTIVE,
        capabilities=records.Capabilities(),
        fabric="",
        lease_ttl=5.0,
        joined_at=1.0,
    )


async def report(client: GroupClient, *queues: int) -> None:
    """Members ``m0..`` report these queue depths (their records replace the previous ones)."""
    for i, queue in enumerate(queues):
        await client.put_record(KeyKind.MEMBER, member(f"m{i}"), f"m{i}")
        load = records.LoadRecord(name=f"m{i}", generation=1, queue_depth=queue, at=time.time())
        await client.put_record(KeyKind.LOAD, load, f"m{i}")


class Driver:
    """The step as the resync timer calls it, against one TransferGroup."""

    def __init__(self, plane: ControlPlane, etcd: EtcdServer, name: str) -> None:
        self.plane, self.name = plane, name
        self.kube = Kube(plane.kubeconfig)
        self.clients = groupclients.GroupClients(self.kube.read_secret, lambda endpoints: endpoints)
        self.autoscaler = scaling.Autoscaler()
        body = {
            "apiVersion": API,
            "kind": "TransferGroup",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "replicas": 2,
                "maxReplicas": 8,
                "etcd": {"endpoints": [etcd.endpoint], "joinTokenSecretRef": {"name": "join"}},
                "autoscaling": {
                    "enabled": True,
                    "targets": {"queueDepthPerMember": 4},
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": DOWN_WINDOW}},
                },
            },
        }
        plane.kubectl("apply", "-f", "-", input=json.dumps(body))
        self.uid = json.loads(plane.kubectl("-n", NS, "get", "tg", name, "-o", "json"))["metadata"]["uid"]

    async def step(self, status: dict[str, Any] | None = None) -> scaling.StepOutcome | None:
        target = scaling.Target(NS, self.name, self.uid)
        tg = json.loads(self.plane.kubectl("-n", NS, "get", "tg", self.name, "-o", "json"))
        conditions = (tg.get("status") or {}).get("conditions") or []
        return await self.autoscaler.step(
            self.kube, self.clients, target, tg["spec"], status or {}, conditions
        )

    async def client(self) -> GroupClient:
        raw = {k: v for k, v in spec_of(self.plane, self.name).items() if k != "autoscaling"}
        return await self.clients.get(NS, self.name, transfergroup.TransferGroupSpec.model_validate(raw))

    async def close(self) -> None:
        await self.clients.close()
        self.kube.close()


async def test_load_scales_up_through_scale_and_down_after_the_window(
    plane: ControlPlane, etcd: EtcdServer
) -> None:
    drive = Driver(plane, etcd, "auto")
    try:
        client = await drive.client()
        first = await drive.step()  # nobody reports yet: no change, and it says so
        assert first is not None and first.decision is not None and not first.scaled
        assert "no member reports load" in first.decision.reason

        await report(client, 12, 12)  # mean 12 against 4: ceil(2 * 3) = 6, within maxStep 4
        up = await drive.step()
        assert up is not None and up.scaled and up.event is not None
        assert (
            up.event[0] == "ScaledUp" and "2 -> 6" in up.event[1] and "queueDepthPerMember 12" in up.event[1]
        )
        assert up.condition == ("True", "ScaledUp", up.event[1])
        written = condition(json.loads(plane.kubectl("-n", NS, "get", "tg", "auto", "-o", "json")), "Scaling")
        assert written is not None and (written["status"], written["reason"]) == ("True", "ScaledUp")
        assert spec_of(plane, "auto")["replicas"] == 6
        assert drive.kube.get_scale(API, "TransferGroup", "auto", NS).replicas == 6

        # a person scales to 5: the autoscaler starts from 5, and 5 members on target keep it
        plane.kubectl("-n", NS, "scale", "tg", "auto", "--replicas=5")
        await report(client, 4, 4, 4, 4, 4)
        same = await drive.step()
        assert same is not None and not same.scaled and spec_of(plane, "auto")["replicas"] == 5

        # idle: one pod at a time, each only once the down window has passed, never below the floor
        await report(client, 0, 0, 0, 0, 0)
        seen = [5]
        deadline = time.monotonic() + 4 * (DOWN_WINDOW + 5)
        while seen[-1] > 2:
            assert time.monotonic() < deadline, f"replicas went {seen}, never to the floor 2"
            await drive.step()
            now = spec_of(plane, "auto")["replicas"]
            if now != seen[-1]:
                seen.append(now)
            await asyncio.sleep(0.1)
        assert seen == [5, 4, 3, 2]  # maxStep 1 down; floor: minPrefill 1 + minDecode 1
        down = condition(json.loads(plane.kubectl("-n", NS, "get", "tg", "auto", "-o", "json")), "Scaling")
        assert down is not None and down["reason"] == "ScaledDown" and "3 -> 2" in down["message"]
        for _ in range(3):
            await drive.step()
        assert spec_of(plane, "auto")["replicas"] == 2
    finally:
        await drive.close()


async def test_no_scaling_while_draining_shrinking_or_invalid(plane: ControlPlane, etcd: EtcdServer) -> None:
    drive = Driver(plane, etcd, "held")
    try:
        await report(await drive.client(), 40, 40)
        held = await drive.step({"draining": ["held-3"]})
        assert held is not None and held.decision is None and "draining held-3" in held.note

        # more pods than spec.replicas: a scale-down is still under way
        drive.kube.patch_status(API, "TransferGroup", "held", NS, {"replicas": 4})
        held = await drive.step()
        assert held is not None and held.decision is None and "4 pods still going to 2" in held.note
        drive.kube.patch_status(API, "TransferGroup", "held", NS, {"replicas": 2})

        plane.kubectl("-n", NS, "patch", "tg", "held", "--type=merge", "-p",
                      json.dumps({"spec": {"autoscaling": {"targets": None}}}))  # fmt: skip
        # the API server filled the targets' default ({}): enabled without a target
        held = await drive.step()
        assert held is not None and held.decision is None and "without a target" in held.note
        assert spec_of(plane, "held")["replicas"] == 2

        plane.kubectl("-n", NS, "patch", "tg", "held", "--type=merge", "-p",
                      json.dumps({"spec": {"autoscaling": {"enabled": False}}}))  # fmt: skip
        assert await drive.step() is None  # off: nothing to report
    finally:
        await drive.close()


def test_the_api_server_refuses_nonsense_in_the_section(plane: ControlPlane, etcd: EtcdServer) -> None:
    body = {
        "apiVersion": API,
        "kind": "TransferGroup",
        "metadata": {"name": "nonsense", "namespace": NS},
        "spec": {
            "etcd": {"endpoints": [etcd.endpoint], "joinTokenSecretRef": {"name": "join"}},
            "autoscaling": {"enabled": True, "targets": {"kvCacheUsage": 1.5}},
        },
    }
    out = plane.kubectl("apply", "-f", "-", input=json.dumps(body), check=False)
    assert "spec.autoscaling.targets.kvCacheUsage" in out


def test_the_operator_scales_a_loaded_group_and_says_why(
    plane: ControlPlane, etcd: EtcdServer, tmp_path: Path
) -> None:
    """`weft operator` as a process: the resync timer reads the load, raises spec.replicas
    through /scale, the StatefulSet follows, and an event and the Scaling condition say why."""
    ns = "weft-autoscale-op"
    plane.kubectl("create", "namespace", ns, check=False)
    plane.kubectl(
        "-n", ns, "create", "secret", "generic", "join", f"--from-literal=token={TOKEN}", check=False
    )
    op = Operator(plane, tmp_path / "operator.log", ns)
    op.start()
    try:
        body = {
            "apiVersion": API,
            "kind": "TransferGroup",
            "metadata": {"name": "busy", "namespace": ns},
            "spec": {
                "replicas": 2,
                "maxReplicas": 6,
                "etcd": {"endpoints": [etcd.endpoint], "joinTokenSecretRef": {"name": "join"}},
                "autoscaling": {"enabled": True, "targets": {"queueDepthPerMember": 4}},
            },
        }
        plane.kubectl("apply", "-f", "-", input=json.dumps(body))
        settings = EtcdSettings(endpoints=[etcd.endpoint])

        async def load() -> None:
            async with GroupClient(settings, GroupRef(namespace=ns, group="busy"), TOKEN.encode()) as client:
                await report(client, 12, 12)

        asyncio.run(load())

        def tg() -> dict[str, Any]:
            return dict(json.loads(plane.kubectl("-n", ns, "get", "tg", "busy", "-o", "json")))

        # the first resync comes RESYNC_SECONDS after the start, the next as long after
        bound = 2 * handlers.RESYNC_SECONDS + 20
        wait_for("spec.replicas 6 from the load", lambda: tg()["spec"]["replicas"] == 6, bound)
        wait_for(
            "the StatefulSet at 6",
            lambda: plane.kubectl("-n", ns, "get", "sts", "busy", "-o", "jsonpath={.spec.replicas}") == "6",
            30,
        )
        events = plane.kubectl("-n", ns, "get", "events", "--field-selector", "involvedObject.name=busy")
        assert "ScaledUp" in events and "2 -> 6" in events, op.tail()
        scaled = wait_for("the Scaling condition", lambda: condition(tg(), "Scaling"), bound)
        assert scaled["status"] == "True" and scaled["reason"] == "ScaledUp"
        plane.kubectl("-n", ns, "delete", "tg", "busy", "--timeout=60s", check=False)
    finally:
        op.stop()
