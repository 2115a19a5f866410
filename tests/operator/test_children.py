"""The operator's renderings of a group's children (pure functions, no API server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from weft.api.transfergroup import AGENT_PORT, HTTP_PORT, TransferGroupSpec
from weft.operator import children

LEGACY = json.loads((Path(__file__).parent / "data" / "legacy_statefulsets.json").read_text())


@pytest.mark.parametrize("case", sorted(LEGACY))
def test_a_legacy_template_renders_the_statefulset_byte_for_byte_as_before(case: str) -> None:
    """Captured before pod templates existed: an operator upgrade must not roll existing pods."""
    stored: dict[str, Any] = LEGACY[case]
    spec = TransferGroupSpec.model_validate(stored["spec"])
    rendered = children.stateful_set("g", "ns", "uid-1", spec, "abc123", replicas=2)
    assert json.dumps(rendered) == json.dumps(stored["statefulSet"])


ETCD = {"endpoints": ["http://etcd:2379"], "joinTokenSecretRef": {"name": "join"}}


def engine_pod(**extra: Any) -> dict[str, Any]:
    """A small engine pod spec (a vLLM-like container and a helper)."""
    return {
        "containers": [
            {
                "name": "vllm",
                "image": "vllm/vllm-openai:v0.6",
                "args": ["--model", "m"],
                "env": [{"name": "HF_HOME", "value": "/cache"}, {"name": "WEFT_NAME", "value": "mine"}],
                "ports": [{"name": "http", "containerPort": 8000}],
                "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
                "resources": {"limits": {"nvidia.com/gpu": 1}},
            },
            {"name": "helper", "image": "busybox"},
        ],
        "volumes": [{"name": "cache", "emptyDir": {}}],
        **extra,
    }


def render(**spec: Any) -> dict[str, Any]:
    parsed = TransferGroupSpec.model_validate({"etcd": ETCD, **spec})
    return children.stateful_set("g", "ns", "uid-1", parsed, "abc123", endpoints=["http://10.0.0.1:2379"])


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {i["name"]: i for i in items}


def test_embedded_mode_injects_weft_into_the_engine_container_and_keeps_the_rest() -> None:
    sts = render(
        template={"metadata": {"labels": {"team": "a", "weft.dev/group": "x"}, "annotations": {"a": "b"}},
                  "spec": engine_pod(serviceAccountName="engine")},
    )  # fmt: skip
    tpl = sts["spec"]["template"]
    assert tpl["metadata"]["labels"]["team"] == "a" and tpl["metadata"]["labels"]["weft.dev/group"] == "g"
    assert tpl["metadata"]["annotations"] == {"a": "b", "weft.dev/config-hash": "abc123"}
    pod = tpl["spec"]
    assert pod["serviceAccountName"] == "engine"
    assert pod["terminationGracePeriodSeconds"] == 35 and pod["enableServiceLinks"] is False
    vllm, helper = pod["containers"]
    assert helper == {"name": "helper", "image": "busybox"}
    env = by_name(vllm["env"])
    assert env["WEFT_NAME"] == {
        "name": "WEFT_NAME",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    }
    assert [e["name"] for e in vllm["env"]].count("WEFT_NAME") == 1  # the operator owns WEFT_*
    assert env["HF_HOME"]["value"] == "/cache"
    assert env["WEFT_CONFIG"]["value"] == "/etc/weft/agent.yaml"
    assert env["WEFT_ETCD"]["value"] == "http://10.0.0.1:2379"
    assert env["WEFT_MODE"]["value"] == "embedded" and "WEFT_AGENT_HTTP" not in env
    assert env["WEFT_GROUP"]["value"] == "g" and env["WEFT_NAMESPACE"]["value"] == "ns"
    assert env["WEFT_SECRET_FILE"]["value"] == "/var/run/weft/join-token/token"
    assert [e["name"] for e in vllm["env"]][-1] == "HF_HOME"  # ours first: $(WEFT_NAME) works
    assert [p["name"] for p in vllm["ports"]] == ["http", "weft-fabric", "weft-http"]
    mounts = by_name(vllm["volumeMounts"])
    assert mounts["weft-config"]["mountPath"] == "/etc/weft" and mounts["weft-join-token"]["readOnly"]
    assert set(by_name(pod["volumes"])) == {"cache", "weft-config", "weft-join-token"}
    assert sts["spec"]["selector"] == {"matchLabels": children.selector("g")}


def test_the_users_grace_period_and_service_links_win() -> None:
    pod = render(template={"spec": engine_pod(terminationGracePeriodSeconds=90, enableServiceLinks=True)})
    spec = pod["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 90 and spec["enableServiceLinks"] is True


def test_tls_and_storage_come_as_files_and_variables() -> None:
    sts = render(
        etcd={**ETCD, "tlsSecretRef": {"name": "tls"}, "joinTokenSecretRef": {"name": "join", "key": "k"}},
        storage={"backend": "OBJ", "params": {"bucket": "b"}, "credentialsSecretRef": {"name": "s3"}},
        engine={"container": "helper"},
        template={"spec": engine_pod()},
    )
    helper = sts["spec"]["template"]["spec"]["containers"][1]
    env = by_name(helper["env"])
    assert env["WEFT_ETCD_CA"]["value"] == "/var/run/weft/etcd-tls/ca.crt"
    assert env["WEFT_SECRET_FILE"]["value"] == "/var/run/weft/join-token/k"
    assert env["LMCACHE_CONFIG_FILE"]["value"] == "/etc/weft/lmcache-config.yaml"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3"
    assert by_name(helper["volumeMounts"])["weft-etcd-tls"]["mountPath"] == "/var/run/weft/etcd-tls"
    vllm = sts["spec"]["template"]["spec"]["containers"][0]
    assert "WEFT_CONFIG" not in by_name(vllm["env"])  # only the named container is joined


def test_sidecar_mode_adds_the_agent_container_and_a_shared_memory_volume() -> None:
    sts = render(
        engine={"mode": "sidecar", "agent": {"image": "reg/weft:1", "resources": {"limits": {"cpu": 1}}},
                "sharedMemory": {"sizeLimit": "8Gi"}},
        template={"spec": engine_pod()},
    )  # fmt: skip
    pod = sts["spec"]["template"]["spec"]
    vllm, _, agent = pod["containers"]
    assert agent["name"] == "weft-agent" and agent["image"] == "reg/weft:1"
    assert agent["args"] == ["agent", "--config", "/etc/weft/agent.yaml"]
    assert agent["resources"] == {"limits": {"cpu": 1}}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8080}
    assert [p["name"] for p in agent["ports"]] == ["weft-fabric", "weft-http"]
    assert [p["name"] for p in vllm["ports"]] == ["http"]  # the agent listens in the sidecar
    env = by_name(vllm["env"])
    assert env["WEFT_MODE"]["value"] == "sidecar"
    assert env["WEFT_AGENT_HTTP"]["value"] == "http://127.0.0.1:8080"
    assert "WEFT_NAME" in by_name(agent["env"]) and "WEFT_MODE" not in by_name(agent["env"])
    shm = by_name(pod["volumes"])["weft-shm"]
    assert shm == {"name": "weft-shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}
    for c in (vllm, agent):
        assert by_name(c["volumeMounts"])["weft-shm"]["mountPath"] == "/dev/shm"
        assert by_name(c["volumeMounts"])["weft-config"]["mountPath"] == "/etc/weft"


def test_the_sidecar_is_linked_to_the_engine_and_both_map_the_kv_pool_file() -> None:
    """The sidecar reads the engine's metrics and posts to its hook; the kv-pool is a file on
    the shared memory volume, named to both containers (the engine maps what peers write)."""
    engine = {
        "mode": "sidecar",
        "metricsUrl": "http://127.0.0.1:8000/metrics",
        "hookUrl": "http://127.0.0.1:8000/weft",
        "sharedMemory": {"mountPath": "/dev/shm/"},
    }
    pod = render(engine=engine, fabric={"kvPoolBytes": 1 << 20}, template={"spec": engine_pod()})
    vllm, _, agent = pod["spec"]["template"]["spec"]["containers"]
    side, eng = by_name(agent["env"]), by_name(vllm["env"])
    assert side["WEFT_ENGINE_METRICS"]["value"] == "http://127.0.0.1:8000/metrics"
    assert side["WEFT_ENGINE_HOOK"]["value"] == "http://127.0.0.1:8000/weft"
    assert "WEFT_ENGINE_HOOK" not in eng  # the engine is not told to call itself
    assert side["WEFT_KV_POOL_FILE"]["value"] == eng["WEFT_KV_POOL_FILE"]["value"] == "/dev/shm/weft-kv-pool"
    no_pool = render(engine=engine, template={"spec": engine_pod()})["spec"]["template"]["spec"]
    assert "WEFT_KV_POOL_FILE" not in by_name(no_pool["containers"][2]["env"])


def test_sidecar_mode_shares_the_engines_own_dev_shm_volume() -> None:
    pod = engine_pod()
    pod["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    pod["containers"][0]["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
    spec = render(engine={"mode": "sidecar"}, template={"spec": pod})["spec"]["template"]["spec"]
    assert "weft-shm" not in by_name(spec["volumes"])
    assert by_name(spec["containers"][2]["volumeMounts"])["dshm"]["mountPath"] == "/dev/shm"
    assert "weft-shm" not in by_name(spec["containers"][0]["volumeMounts"])


def test_the_template_spec_is_not_modified_in_place() -> None:
    parsed = TransferGroupSpec.model_validate({"etcd": ETCD, "template": {"spec": engine_pod()}})
    before = json.dumps(parsed.template.spec)
    children.stateful_set("g", "ns", "u", parsed, "h")
    assert json.dumps(parsed.template.spec) == before


def test_the_network_policy_admits_the_group_to_its_data_port_and_anyone_to_declared_ports() -> None:
    spec = TransferGroupSpec.model_validate({"etcd": ETCD, "template": {"spec": engine_pod()}})
    policy = children.network_policy("g", "ns", "uid-1", spec)
    assert policy["kind"] == "NetworkPolicy" and policy["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    body = policy["spec"]
    assert body["podSelector"] == {"matchLabels": children.selector("g")}
    assert body["policyTypes"] == ["Ingress"]
    own, anyone = body["ingress"]
    # the group's own pods, on every port (the fabric's, and whatever its backends open)
    assert own == {"from": [{"podSelector": {"matchLabels": children.selector("g")}}]}
    # every selector of the policy matches the labels the group's pods carry
    pod_labels = render(template={"spec": engine_pod()})["spec"]["template"]["metadata"]["labels"]
    assert children.selector("g").items() <= pod_labels.items()
    # anyone: the HTTP port and the engine's declared port, never the fabric's
    assert "from" not in anyone
    ports = {(p["port"], p["protocol"]) for p in anyone["ports"]}
    assert ports == {(HTTP_PORT, "TCP"), (8000, "TCP")}
    assert AGENT_PORT not in {p for p, _ in ports}


def test_a_legacy_group_s_network_policy_opens_only_the_http_port() -> None:
    spec = TransferGroupSpec.model_validate({"etcd": ETCD})
    _, anyone = children.network_policy("g", "ns", "uid-1", spec)["spec"]["ingress"]
    assert anyone == {"ports": [{"protocol": "TCP", "port": HTTP_PORT}]}
