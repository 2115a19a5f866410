"""The chaos suite's TransferGroup (engine pods in sidecar mode) is one the real API server
takes, that passes the operator's checks, and whose StatefulSet the API server takes too;
the engine-load round's autoscaling section likewise. Cheap to check here, slow to find out
in a cluster."""

from __future__ import annotations

import json

import pytest

from e2e import scenarios
from weft.api.transfergroup import TransferGroupSpec, cross_field_problems
from weft.operator import children
from weft.testing.controlplane import ControlPlane

pytestmark = pytest.mark.integration


def manifest() -> dict[str, object]:
    return scenarios.group_manifest(
        namespace="chaos-check", name="chaos", replicas=4, image="weft-agent:test",
        endpoints=["http://198.19.0.10:2379"], token_secret="weft-join-token", pull_policy="Never",
    )  # fmt: skip


def test_the_chaos_group_and_its_statefulset_are_valid(tg_crd: ControlPlane) -> None:
    m = manifest()
    spec_doc = m["spec"]
    assert isinstance(spec_doc, dict)
    spec = TransferGroupSpec.model_validate({**spec_doc, "autoscaling": scenarios.AUTOSCALING})
    assert cross_field_problems(spec) == []
    tg_crd.kubectl("create", "namespace", "chaos-check", check=False)
    tg_crd.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(m))
    with_autoscaling = {**m, "spec": {**spec_doc, "autoscaling": scenarios.AUTOSCALING}}
    tg_crd.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(with_autoscaling))
    sts = children.stateful_set("chaos", "chaos-check", "uid-1", spec, "hash", endpoints=["http://e:2379"])
    tg_crd.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(sts))
    pod = sts["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["engine", "weft-agent"]
    agent_env = {e["name"]: e.get("value") for e in pod["containers"][1]["env"]}
    assert agent_env["WEFT_ENGINE_METRICS"] == f"http://127.0.0.1:{scenarios.ENGINE_PORT}/metrics"
    assert agent_env["WEFT_KV_POOL_FILE"] == "/dev/shm/weft-kv-pool"


def test_with_the_chart_s_client_secret_the_members_dial_etcd_with_tls() -> None:
    m = scenarios.group_manifest(
        namespace="chaos-check", name="chaos", replicas=4, image="weft-agent:test",
        endpoints=["https://198.19.0.250:2379"], token_secret="weft-join-token",
        tls_secret="weft-etcd-client", pull_policy="Never",
    )  # fmt: skip
    spec_doc = m["spec"]
    assert isinstance(spec_doc, dict)
    assert spec_doc["etcd"]["tlsSecretRef"] == {"name": "weft-etcd-client"}
    spec = TransferGroupSpec.model_validate(spec_doc)
    sts = children.stateful_set("chaos", "chaos-check", "uid-1", spec, "hash")
    pod = sts["spec"]["template"]["spec"]
    agent_env = {e["name"]: e.get("value") for e in pod["containers"][1]["env"]}
    assert agent_env["WEFT_ETCD"] == "https://198.19.0.250:2379"
    assert agent_env["WEFT_ETCD_CERT"].endswith("/tls.crt") and agent_env["WEFT_ETCD_CA"].endswith("/ca.crt")
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert "weft-etcd-client" in secrets
    assert "tlsSecretRef" not in manifest()["spec"]["etcd"]  # type: ignore[index]
