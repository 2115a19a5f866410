"""`weft operator` (a separate process) against the real kube-apiserver and a real etcd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent.test_cli import TOKEN, AgentProcess, start_agent, token_file, wait_for
from tests.k8s_fixtures import CRD_FILE
from weft.api.agent_settings import parse_yaml
from weft.kvstore import load_lmcache_config
from weft.operator import handlers
from weft.testing.controlplane import ControlPlane
from weft.testing.etcd import EtcdServer

pytestmark = pytest.mark.integration
__all__ = ["start_agent", "token_file"]  # the agent-process fixtures, shared
NS = "weft-op"


class Operator:
    def __init__(
        self,
        plane: ControlPlane,
        log: Path,
        namespace: str = NS,
        *peering: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.plane, self.log, self.namespace, self.peering = plane, log, namespace, list(peering)
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.plane.kubeconfig), **self.env}
        mode = self.peering or ["--standalone"]
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "weft.cli", "operator", "--namespace", self.namespace, *mode],
                stdout=sink,
                stderr=sink,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self) -> str:
        """The whole log (the name is what a failure message wants: its end)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture(scope="module")
def operator(tg_crd: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    tg_crd.kubectl("create", "namespace", NS, check=False)
    tg_crd.kubectl(
        "-n",
        NS,
        "create",
        "secret",
        "generic",
        "join",
        "--from-literal=token=0123456789abcdef0123",
        check=False,
    )
    op = Operator(tg_crd, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    yield op
    op.stop()


def kget(plane: ControlPlane, *args: str) -> dict[str, Any] | None:
    out = plane.kubectl("-n", NS, "get", *args, "-o", "json", check=False)
    try:
        return dict(json.loads(out))
    except ValueError:
        return None


def apply_tg(
    plane: ControlPlane, name: str, etcd: str, *, namespace: str = NS, secret: str = "join", **spec: Any
) -> dict[str, Any]:
    """kubectl apply a TransferGroup (join token in Secret `secret`); the stored object."""
    body = {
        "apiVersion": "weft.dev/v1alpha1",
        "kind": "TransferGroup",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"etcd": {"endpoints": [etcd], "joinTokenSecretRef": {"name": secret}}, **spec},
    }
    plane.kubectl("apply", "-f", "-", input=json.dumps(body))
    return dict(json.loads(plane.kubectl("-n", namespace, "get", "tg", name, "-o", "json")))


def condition(obj: dict[str, Any] | None, ctype: str) -> dict[str, Any] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return dict(c)
    return None


def test_a_group_gets_its_children_owned_and_an_honest_status(operator: Operator, etcd: EtcdServer) -> None:
    plane = operator.plane
    tg = apply_tg(plane, "alpha", etcd.endpoint, replicas=3, roles={"ratio": "1:3"})
    uid = tg["metadata"]["uid"]
    for kind, name in (
        ("statefulset", "alpha"),
        ("service", "alpha"),
        ("configmap", "alpha-agent"),
        ("pdb", "alpha"),
    ):
        obj = wait_for(f"{kind} {name}", lambda k=kind, n=name: kget(plane, k, n), 30)  # type: ignore[misc]
        owners = obj["metadata"].get("ownerReferences") or []
        assert [(o["kind"], o["uid"], o.get("controller")) for o in owners] == [("TransferGroup", uid, True)]
    sts = kget(plane, "statefulset", "alpha")
    assert sts is not None
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
    assert not sts["spec"]["template"]["spec"]["containers"][0].get("resources")  # no GPU asked: GPU-less
    config = parse_yaml((kget(plane, "configmap", "alpha-agent") or {})["data"]["agent.yaml"])
    assert config["group"] == {"namespace": NS, "group": "alpha"} and config["planning"]["ratio"] == "1:3"
    assert config["etcd"]["endpoints"] == [etcd.endpoint]
    ready = wait_for("the Ready condition", lambda: condition(kget(plane, "tg", "alpha"), "Ready"), 30)
    status = (kget(plane, "tg", "alpha") or {})["status"]
    assert (
        ready["status"] == "False" and ready["reason"] == "AgentsNotReady"
    )  # no kubelet here: pods never run
    assert condition(kget(plane, "tg", "alpha"), "Valid") == {
        **condition(kget(plane, "tg", "alpha"), "Valid"),
        "status": "True",
    }  # type: ignore[dict-item]
    assert status["observedGeneration"] == tg["metadata"]["generation"] and status["phase"] == "Pending"
    assert status["selector"] == "app.kubernetes.io/name=weft-agent,weft.dev/group=alpha"


def test_spec_changes_and_kubectl_scale_reach_the_children(operator: Operator, etcd: EtcdServer) -> None:
    plane = operator.plane
    apply_tg(plane, "beta", etcd.endpoint, replicas=2)
    first = wait_for("the StatefulSet", lambda: kget(plane, "statefulset", "beta"), 30.0)
    hash_before = first["spec"]["template"]["metadata"]["annotations"]["weft.dev/config-hash"]
    apply_tg(plane, "beta", etcd.endpoint, replicas=4, roles={"ratio": "1:3"},
             template={"resources": {"limits": {"nvidia.com/gpu": 1}}})  # fmt: skip
    sts = wait_for(
        "replicas 4 and a GPU limit",
        lambda: (
            (
                (s := kget(plane, "statefulset", "beta"))
                and s["spec"]["replicas"] == 4
                and bool(s["spec"]["template"]["spec"]["containers"][0].get("resources"))
                and s
            )
            or None
        ),
        30.0,
    )
    assert sts["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert sts["spec"]["template"]["metadata"]["annotations"]["weft.dev/config-hash"] != hash_before
    plane.kubectl("-n", NS, "scale", "tg", "beta", "--replicas=6")
    wait_for(
        "replicas 6 after kubectl scale",
        lambda: (kget(plane, "statefulset", "beta") or {})["spec"]["replicas"] == 6,
        30.0,
    )


def test_children_that_drift_are_repaired(operator: Operator, etcd: EtcdServer) -> None:
    plane = operator.plane
    apply_tg(plane, "gamma", etcd.endpoint, replicas=2)
    wait_for("the Service", lambda: kget(plane, "service", "gamma"), 30.0)
    plane.kubectl("-n", NS, "delete", "service", "gamma")
    plane.kubectl(
        "-n", NS, "patch", "statefulset", "gamma", "--type=merge", "-p", '{"spec": {"replicas": 9}}'
    )
    wait_for("the Service back", lambda: kget(plane, "service", "gamma"), 40)
    wait_for(
        "replicas back to 2", lambda: (kget(plane, "statefulset", "gamma") or {})["spec"]["replicas"] == 2, 40
    )


def test_a_spec_that_cannot_work_is_reported_and_nothing_is_built(
    operator: Operator, etcd: EtcdServer
) -> None:
    plane = operator.plane
    apply_tg(plane, "delta", etcd.endpoint, replicas=2, experts={"count": 8, "replication": 3})
    valid = wait_for("the Valid condition", lambda: condition(kget(plane, "tg", "delta"), "Valid"), 30.0)
    assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
    assert "spec.experts.replication (3)" in valid["message"]
    assert (kget(plane, "tg", "delta") or {})["status"]["phase"] == "Invalid"
    assert kget(plane, "statefulset", "delta") is None
    events = plane.kubectl("-n", NS, "get", "events", "--field-selector", "involvedObject.name=delta")
    assert "InvalidSpec" in events


def test_etcd_named_by_its_service_reaches_the_agents_as_a_cluster_ip(
    operator: Operator, etcd: EtcdServer
) -> None:
    """No cluster DNS needed: `<svc>.<ns>.svc` endpoints are resolved through the API."""
    plane = operator.plane
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "group-etcd", "namespace": NS},
        "spec": {"ports": [{"port": 2379, "protocol": "TCP"}], "selector": {"app": "etcd"}},
    }
    plane.kubectl("apply", "-f", "-", input=json.dumps(service))
    ip = (kget(plane, "service", "group-etcd") or {})["spec"]["clusterIP"]
    apply_tg(plane, "dnsless", f"http://group-etcd.{NS}.svc:2379", replicas=1)
    cm = wait_for("the ConfigMap", lambda: kget(plane, "configmap", "dnsless-agent"), 30.0)
    endpoints = parse_yaml(cm["data"]["agent.yaml"])["etcd"]["endpoints"]
    assert endpoints == [f"http://{ip}:2379"]
    apply_tg(plane, "dnsful", f"http://missing.{NS}.svc.cluster.local:2379", replicas=1)
    cm = wait_for("the ConfigMap", lambda: kget(plane, "configmap", "dnsful-agent"), 30.0)
    # a Service the API does not have stays a name (cluster DNS may still know it)
    assert parse_yaml(cm["data"]["agent.yaml"])["etcd"]["endpoints"] == [
        f"http://missing.{NS}.svc.cluster.local:2379"
    ]
    for name in ("dnsless", "dnsful"):
        plane.kubectl("-n", NS, "delete", "tg", name, "--wait=false")


def test_delete_clears_the_group_s_etcd_prefix_and_the_children_go(
    operator: Operator, etcd: EtcdServer
) -> None:
    plane = operator.plane
    apply_tg(plane, "omega", etcd.endpoint, replicas=1)
    wait_for("the StatefulSet", lambda: kget(plane, "statefulset", "omega"), 30.0)
    etcd.etcdctl("put", f"/weft/v1/{NS}/omega/members/a0", "x")
    etcd.etcdctl("put", f"/weft/v1/{NS}/omega/plan", "y")
    etcd.etcdctl("put", f"/weft/v1/{NS}/omega-other/plan", "kept")  # a neighbour's prefix
    plane.kubectl("-n", NS, "delete", "tg", "omega", "--timeout=60s")
    assert etcd.etcdctl("get", "--prefix", f"/weft/v1/{NS}/omega/", "--keys-only").strip() == ""
    assert "kept" in etcd.etcdctl("get", f"/weft/v1/{NS}/omega-other/plan")
    wait_for("children collected", lambda: kget(plane, "statefulset", "omega") is None, 40)


def test_status_mirrors_the_plan_of_agents_running_as_processes(
    operator: Operator, etcd: EtcdServer, start_agent: Callable[..., AgentProcess]
) -> None:
    """Agents as local processes join the group in etcd; the status shows members, roles and
    the epoch; a SIGKILLed agent is gone from the status within seconds."""
    plane = operator.plane
    plane.kubectl(
        "-n", NS, "create", "secret", "generic", "join-m", f"--from-literal=token={TOKEN}", check=False
    )
    apply_tg(plane, "mirror", etcd.endpoint, secret="join-m", replicas=3, roles={"ratio": "1:2"})
    flags = ("--group", "mirror", "--namespace", NS, "--ratio", "1:2", "--lease-ttl", "2")
    agents = [start_agent(f"m{i}", *flags) for i in range(3)]

    def mirrored(members: int) -> dict[str, Any] | None:
        st = (kget(plane, "tg", "mirror") or {}).get("status") or {}
        ok = (
            st.get("members") == members
            and st.get("planEpoch")
            and st.get("prefill", 0) + st.get("decode", 0) == members
        )
        rebalancing = condition({"status": st}, "Rebalancing")
        return st if ok and rebalancing and rebalancing["status"] == "False" else None

    first = wait_for("three members, their roles and a settled epoch in the status", lambda: mirrored(3), 30)
    assert (first["prefill"], first["decode"]) == (1, 2)
    columns = plane.kubectl("-n", NS, "get", "tg", "mirror").splitlines()[1].split()
    assert columns[2:5] == ["3", "1", "2"] and columns[5] == str(
        first["planEpoch"]
    )  # Members Prefill Decode Epoch
    agents[1].proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    second = wait_for("the killed agent gone from the status", lambda: mirrored(2), 20)
    seen = time.monotonic() - killed
    print(f"SIGKILL to status without it: {seen * 1e3:.0f} ms")
    assert second["planEpoch"] > first["planEpoch"] and seen < 10


def test_an_operator_killed_mid_reconcile_converges_when_started_again(
    tg_crd: ControlPlane, etcd: EtcdServer, tmp_path: Path
) -> None:
    ns = "weft-op-restart"
    plane = tg_crd
    plane.kubectl("create", "namespace", ns)
    op = Operator(plane, tmp_path / "operator.log", namespace=ns)
    op.start()
    try:
        apply_tg(plane, "phoenix", etcd.endpoint, namespace=ns, replicas=2)

        def children_started() -> bool:  # the first child is there: the reconcile is under way
            return "phoenix-agent" in plane.kubectl("-n", ns, "get", "configmaps", "-o", "name", check=False)

        wait_for("the reconcile to begin", children_started, 30)
        op.stop()  # SIGKILL, between two children or just after the last
        apply_tg(plane, "phoenix", etcd.endpoint, namespace=ns, replicas=3)  # changed while no operator runs
        op.start()

        def converged() -> dict[str, Any] | None:
            tg = json.loads(plane.kubectl("-n", ns, "get", "tg", "phoenix", "-o", "json"))
            st = tg.get("status") or {}
            ok = (
                st.get("observedGeneration") == tg["metadata"]["generation"]
                and st.get("replicas") is not None
            )
            return tg if ok and condition(tg, "Valid") else None

        tg = wait_for("the group to converge after the restart", converged, 40)
        selector = "weft.dev/group=phoenix"
        for kind in ("statefulsets", "services", "configmaps", "poddisruptionbudgets"):
            names = plane.kubectl("-n", ns, "get", kind, "-l", selector, "-o", "name").split()
            assert len(names) == 1, f"{kind}: {names}"  # one of each, owned by the group
        sts = json.loads(plane.kubectl("-n", ns, "get", "statefulset", "phoenix", "-o", "json"))
        assert sts["spec"]["replicas"] == 3
        assert sts["metadata"]["ownerReferences"][0]["uid"] == tg["metadata"]["uid"]
    finally:
        plane.kubectl(
            "-n", ns, "delete", "tg", "phoenix", "--timeout=60s", check=False
        )  # its finalizer needs the operator
        op.stop()


def test_scale_down_drains_the_leaving_member_before_its_pod_goes(
    operator: Operator, etcd: EtcdServer, start_agent: Callable[..., AgentProcess]
) -> None:
    """kubectl scale 3 -> 2: the operator asks the planner to plan drainy-2 out (its experts move
    to the others), waits until every remaining member applied that plan, and only then lowers
    the StatefulSet's replicas."""
    plane = operator.plane
    plane.kubectl(
        "-n", NS, "create", "secret", "generic", "join-d", f"--from-literal=token={TOKEN}", check=False
    )
    apply_tg(
        plane, "drainy", etcd.endpoint, secret="join-d", replicas=3, experts={"count": 8, "replication": 2}
    )
    flags = ("--group", "drainy", "--namespace", NS, "--experts", "8", "--replication", "2")
    flags += ("--expert-source", "synthetic:4096", "--lease-ttl", "2")
    agents = [start_agent(f"drainy-{i}", *flags) for i in range(3)]

    def settled(n: int) -> dict[str, Any] | None:
        st = (kget(plane, "tg", "drainy") or {}).get("status") or {}
        reb = condition({"status": st}, "Rebalancing")
        ok = (
            st.get("members") == n
            and reb is not None
            and reb["status"] == "False"
            and not st.get("underReplicated")
        )
        return st if ok else None

    wait_for("three agents planned and settled", lambda: settled(3), 30)
    plane.kubectl("-n", NS, "scale", "tg", "drainy", "--replicas=2")
    # while the StatefulSet still has 3, drainy-2 is asked to drain; the STS shrinks only after
    saw_hold = False
    deadline = time.monotonic() + 60
    while True:
        sts = (kget(plane, "statefulset", "drainy") or {})["spec"]["replicas"]
        plan = agents[0].status().get("plan") or {}
        if sts == 3 and "drainy-2" in ((kget(plane, "tg", "drainy") or {}).get("status") or {}).get(
            "draining", []
        ):
            saw_hold = True
        if sts == 2:
            assert set(plan["roles"]) == {"drainy-0", "drainy-1"}, "the pod went before the plan let it go"
            assert all("drainy-2" not in hosts for hosts in plan.get("experts", {}).values())
            assert not plan.get("under_replicated")
            break
        assert time.monotonic() < deadline, "the StatefulSet never scaled down"
        time.sleep(0.05)
    assert saw_hold  # the operator held the pod while the plan moved its work
    events = plane.kubectl("-n", NS, "get", "events", "--field-selector", "involvedObject.name=drainy")
    assert "Draining" in events


def test_operator_replicas_elect_one_and_the_next_takes_over(
    tg_crd: ControlPlane, etcd: EtcdServer, tmp_path: Path
) -> None:
    """Two replicas (kopf peering, distinct priorities): the higher one works, the other
    pauses; SIGKILL the leader and the other resumes once its peering record expires, within
    seconds. Both make each group's NetworkPolicy (as the chart runs them)."""
    ns = "weft-op-peers"
    plane = tg_crd
    plane.kubectl("apply", "-f", str(CRD_FILE.parent / "kopf-peering.yaml"))
    plane.kubectl("create", "namespace", ns)
    policies = {handlers.NETWORK_POLICIES_ENV: "true"}
    leader = Operator(plane, tmp_path / "leader.log", ns, "--priority", "200", env=policies)
    second = Operator(plane, tmp_path / "second.log", ns, "--priority", "100", env=policies)
    leader.start()
    try:
        wait_for("the leader to start working", lambda: "Resuming operations" in leader.tail(), 30)
        second.start()
        wait_for(
            "the second replica to start", lambda: "Initial authentication has finished" in second.tail(), 30
        )
        time.sleep(3)
        assert "Resuming operations" not in second.tail()  # it stays paused behind the leader
        apply_tg(plane, "first", etcd.endpoint, namespace=ns, secret="j", replicas=1)
        wait_for(
            "the leader to build the first group",
            lambda: "statefulset.apps/first" in plane.kubectl("-n", ns, "get", "statefulsets", "-o", "name"),
            30,
        )
        # the StatefulSet exists before the handler that made it logs its success: wait for that
        wait_for(
            "the leader's reconcile to finish", lambda: "Handler 'reconcile' succeeded" in leader.tail(), 30
        )
        assert "Handler 'reconcile'" not in second.tail()
        leader.stop()
        killed = time.monotonic()
        apply_tg(plane, "second", etcd.endpoint, namespace=ns, secret="j", replicas=1)
        wait_for(
            "the other replica to take over",
            lambda: "statefulset.apps/second" in plane.kubectl("-n", ns, "get", "statefulsets", "-o", "name"),
            60,
        )
        took = time.monotonic() - killed
        print(f"leader SIGKILLed -> the other replica built a new group: {took:.1f} s")
        assert "Resuming operations" in second.tail()
        # the record's lifetime and the reconcile, with room for a busy machine (it was 15 s + )
        assert took < handlers.PEERING_LIFETIME + 10, took
        for name in ("first", "second"):
            policy = json.loads(plane.kubectl("-n", ns, "get", "networkpolicy", name, "-o", "json"))
            assert policy["spec"]["podSelector"]["matchLabels"]["weft.dev/group"] == name
        for name in ("first", "second"):
            plane.kubectl("-n", ns, "delete", "tg", name, "--timeout=60s", check=False)
    finally:
        leader.stop()
        second.stop()


def test_the_storage_tier_reaches_the_pods_as_an_lmcache_config_with_secrets_by_reference(
    operator: Operator, etcd: EtcdServer
) -> None:
    plane = operator.plane
    storage = {
        "backend": "OBJ",
        "params": {
            "bucket": "kv-cache",
            "region": "us-east-1",
            "endpoint_override": "http://198.18.0.9:9000",
        },
        "credentialsSecretRef": {"name": "s3-creds"},
    }
    apply_tg(
        plane,
        "kv",
        etcd.endpoint,
        replicas=2,
        storage=storage,
        fabric={"bufferSize": 1 << 26, "poolSize": 16},
    )
    cm = wait_for("the ConfigMap", lambda: kget(plane, "configmap", "kv-agent"), 30.0)
    text = cm["data"]["lmcache-config.yaml"]
    config = load_lmcache_config(parse_yaml(text))  # what LMCache and weft.kvstore load
    assert config.backend.value == "OBJ" and config.obj_params.bucket == "kv-cache"
    assert config.nixl_buffer_size == 1 << 26 and config.extra_config.nixl_pool_size == 16
    assert "secret" not in text and "access_key" not in text
    sts = wait_for("the StatefulSet", lambda: kget(plane, "statefulset", "kv"), 30.0)
    env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LMCACHE_CONFIG_FILE"]["value"] == "/etc/weft/lmcache-config.yaml"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds",
        "key": "secret_key",
        "optional": True,
    }


def test_an_engine_template_gets_weft_injected_by_the_running_operator(
    operator: Operator, etcd: EtcdServer
) -> None:
    plane = operator.plane
    engine = {"name": "engine", "image": "engine:1", "ports": [{"containerPort": 9000}]}
    apply_tg(plane, "engine", etcd.endpoint, replicas=1, template={"spec": {"containers": [engine]}})
    sts = wait_for("the StatefulSet", lambda: kget(plane, "statefulset", "engine"), 30.0)
    container = sts["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["image"] == "engine:1" and env["WEFT_ETCD"] == etcd.endpoint.rstrip("/")
    assert env["WEFT_MODE"] == "embedded" and env["WEFT_GROUP"] == "engine"
    assert [p["containerPort"] for p in container["ports"]] == [9000, 7400, 8080]
    taken = {"name": "engine", "image": "engine:1", "ports": [{"containerPort": 8080}]}
    apply_tg(plane, "taken", etcd.endpoint, replicas=1, template={"spec": {"containers": [taken]}})
    valid = wait_for("the Valid condition", lambda: condition(kget(plane, "tg", "taken"), "Valid"), 30.0)
    assert valid["status"] == "False" and "uses port 8080" in valid["message"]
    assert kget(plane, "statefulset", "taken") is None
    for name in ("engine", "taken"):
        plane.kubectl("-n", NS, "delete", "tg", name, "--wait=false")
