"""A TransferGroup with the user's engine pod: the operator's rendering, created on a real
kube-apiserver 1.20, which validates the StatefulSet's pod template in full (names, ports,
mounts against volumes, env sources) -- what the CRD's schema alone cannot."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from tests.operator.test_crd import VLLM_POD, apply, tg
from weft.api.agent_settings import dump_yaml
from weft.api.transfergroup import TransferGroupSpec, cross_field_problems
from weft.operator import children, kube
from weft.testing.controlplane import ControlPlane

pytestmark = pytest.mark.integration
NS = "weft-pt"


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {i["name"]: i for i in items}


def rendered_and_created(plane: ControlPlane, name: str, **spec: Any) -> dict[str, Any]:
    """Apply the group, render its children from what the API stored, create them server-side;
    the StatefulSet as the API server stored it."""
    plane.kubectl("create", "namespace", NS, check=False)
    obj = tg(name, **spec)
    obj["metadata"]["namespace"] = NS
    done = apply(plane, obj)
    assert done.returncode == 0, done.stderr
    stored = json.loads(plane.kubectl("-n", NS, "get", "tg", name, "-o", "json"))
    parsed = TransferGroupSpec.model_validate(stored["spec"])
    assert cross_field_problems(parsed) == []
    uid = stored["metadata"]["uid"]
    config = dump_yaml(children.agent_config(name, NS, parsed))
    sts = children.stateful_set(name, NS, uid, parsed, "cafe", endpoints=["http://10.1.2.3:2379"])
    for manifest in (children.config_map(name, NS, uid, parsed, config), sts):
        plane.kubectl("create", "-f", "-", input=json.dumps(manifest))
    live = dict(json.loads(plane.kubectl("-n", NS, "get", "statefulset", name, "-o", "json")))
    desired = {k: v for k, v in sts.items() if k not in ("apiVersion", "kind")}
    assert kube.contains(live, desired), "the operator would see drift and patch at every resync"
    return live


def test_embedded_mode_renders_a_statefulset_the_api_server_accepts(tg_crd: ControlPlane) -> None:
    sts = rendered_and_created(
        tg_crd, "emb", template={"metadata": {"labels": {"app": "vllm"}}, "spec": VLLM_POD}
    )
    tpl = sts["spec"]["template"]
    assert tpl["metadata"]["labels"]["app"] == "vllm" and tpl["metadata"]["labels"]["weft.dev/group"] == "emb"
    pod = tpl["spec"]
    assert [c["name"] for c in pod["containers"]] == ["vllm"]
    assert [c["name"] for c in pod["initContainers"]] == ["fetch"]
    vllm = pod["containers"][0]
    env = by_name(vllm["env"])
    assert env["WEFT_MODE"]["value"] == "embedded" and env["WEFT_ETCD"]["value"] == "http://10.1.2.3:2379"
    assert env["WEFT_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf"
    assert [p["containerPort"] for p in vllm["ports"]] == [8000, 7400, 8080]
    assert set(by_name(vllm["volumeMounts"])) == {"models", "dshm", "weft-config", "weft-join-token"}
    assert pod["serviceAccountName"] == "vllm" and pod["runtimeClassName"] == "nvidia"
    assert pod["terminationGracePeriodSeconds"] == 35
    assert sts["spec"]["selector"]["matchLabels"] == children.selector("emb")
    tg_crd.kubectl("-n", NS, "delete", "tg", "emb")


def test_sidecar_mode_renders_a_statefulset_the_api_server_accepts(tg_crd: ControlPlane) -> None:
    pod_spec = copy.deepcopy(VLLM_POD)
    pod_spec["containers"][0]["volumeMounts"] = [{"name": "models", "mountPath": "/models"}]  # no /dev/shm
    sts = rendered_and_created(
        tg_crd,
        "side",
        engine={"mode": "sidecar", "sharedMemory": {"sizeLimit": "2Gi"}},
        etcd={"endpoints": ["https://etcd:2379"], "joinTokenSecretRef": {"name": "tok", "key": "t"},
              "tlsSecretRef": {"name": "etcd-tls"}},
        storage={"backend": "OBJ", "params": {"bucket": "kv"}, "credentialsSecretRef": {"name": "s3"}},
        template={"spec": pod_spec},
    )  # fmt: skip
    pod = sts["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["vllm", "weft-agent"]
    vllm, agent = pod["containers"]
    assert by_name(vllm["env"])["WEFT_AGENT_HTTP"]["value"] == "http://127.0.0.1:8080"
    assert by_name(agent["env"])["WEFT_ETCD_KEY"]["value"] == "/var/run/weft/etcd-tls/tls.key"
    assert by_name(agent["env"])["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3"
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert [p["containerPort"] for p in vllm["ports"]] == [8000]
    assert [p["containerPort"] for p in agent["ports"]] == [7400, 8080]
    shm = by_name(pod["volumes"])["weft-shm"]["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": "2Gi"}
    for c in (vllm, agent):
        mounts = by_name(c["volumeMounts"])
        assert mounts["weft-shm"]["mountPath"] == "/dev/shm" and mounts["weft-etcd-tls"]["readOnly"]
    tg_crd.kubectl("-n", NS, "delete", "tg", "side")
