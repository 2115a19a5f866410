"""The TransferGroup CRD: generated from weft.api, accepted by a real kube-apiserver 1.20, which
applies its defaults, serves its subresources and rejects bad objects with the field named."""

from __future__ import annotations

import copy
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.k8s_fixtures import CRD_FILE
from weft import cli
from weft.api import podschema
from weft.api.agent_settings import dump_yaml
from weft.api.transfergroup import TransferGroupSpec, crd_manifest, crd_yaml, cross_field_problems
from weft.testing.controlplane import ControlPlane


def test_the_crd_file_is_what_weft_crds_generates() -> None:
    assert CRD_FILE.read_text() == crd_yaml(), "crds/transfergroup.yaml drifted: run `weft crds`"


def tg(name: str, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "etcd": {"endpoints": ["http://127.0.0.1:2379"], "joinTokenSecretRef": {"name": "tg-token"}},
    }
    base.update(spec)
    return {
        "apiVersion": "weft.dev/v1alpha1",
        "kind": "TransferGroup",
        "metadata": {"name": name},
        "spec": base,
    }


def apply(
    plane: ControlPlane, obj: dict[str, Any], *, server_only: bool = False
) -> subprocess.CompletedProcess[str]:
    """kubectl apply; `server_only`: without kubectl's own schema check, so the API server judges."""
    validate = ["--validate=false"] if server_only else []
    return subprocess.run(
        [str(plane.bin / "kubectl"), "--kubeconfig", str(plane.kubeconfig), "apply", *validate, "-f", "-"],
        input=json.dumps(obj),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.integration
def test_a_minimal_group_gets_the_defaults_and_the_columns(tg_crd: ControlPlane) -> None:
    done = apply(tg_crd, tg("minimal"))
    assert done.returncode == 0, done.stderr
    stored = json.loads(tg_crd.kubectl("get", "tg", "minimal", "-o", "json"))
    spec = stored["spec"]
    assert spec["replicas"] == 2 and spec["maxReplicas"] == 64
    assert spec["roles"]["ratio"] == "1:1" and spec["failureDetection"]["leaseTtlSeconds"] == 3
    TransferGroupSpec.model_validate(spec)  # what the server stores, the operator reads
    header = tg_crd.kubectl("get", "transfergroups.weft.dev").splitlines()[0].split()
    assert header == ["NAME", "READY", "MEMBERS", "PREFILL", "DECODE", "EPOCH", "AGE"]
    tg_crd.kubectl("delete", "tg", "minimal")


@pytest.mark.integration
def test_kubectl_scale_goes_through_the_scale_subresource(tg_crd: ControlPlane) -> None:
    assert apply(tg_crd, tg("scaled", replicas=2)).returncode == 0
    tg_crd.kubectl("scale", "tg", "scaled", "--replicas=5")
    assert json.loads(tg_crd.kubectl("get", "tg", "scaled", "-o", "json"))["spec"]["replicas"] == 5
    scale = json.loads(
        tg_crd.kubectl(
            "get", "--raw", "/apis/weft.dev/v1alpha1/namespaces/default/transfergroups/scaled/scale"
        )
    )
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 5
    tg_crd.kubectl("delete", "tg", "scaled")


def _spec_with(path: str, value: Any) -> dict[str, Any]:
    spec: dict[str, Any] = tg("x")["spec"]
    spec = copy.deepcopy(spec)
    node = spec
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return spec


INVALID = [
    ("replicas", -1, "spec.replicas", "should be greater than or equal to 0"),
    ("replicas", "three", "spec.replicas", "must be of type integer"),
    ("roles.ratio", "3-1", "spec.roles.ratio", "should match"),
    ("roles.ratio", "0:1", "spec.roles.ratio", "should match"),
    ("roles.policy", "random", "spec.roles.policy", 'supported values: "ratio", "load"'),
    ("experts.replication", 0, "spec.experts.replication", "should be greater than or equal to 1"),
    (
        "fabric.backends",
        ["tcp", "rdma"],
        "spec.fabric.backends",
        'supported values: "local", "tcp", "ucx"',
    ),
    ("fabric.backends", [], "spec.fabric.backends", "should have at least 1 items"),
    ("fabric.bufferDevice", "tpu", "spec.fabric.bufferDevice", 'supported values: "cpu", "cuda"'),
    ("fabric.bufferSize", 100, "spec.fabric.bufferSize", "should be greater than or equal to 4096"),
    ("storage", {"path": "/kv"}, "spec.storage.backend", "Required value"),
    ("storage.backend", "NVME", "spec.storage.backend", "supported values"),
    ("storage.path", "relative/dir", "spec.storage.path", "should match '^/'"),
    (
        "failureDetection.leaseTtlSeconds",
        0,
        "spec.failureDetection.leaseTtlSeconds",
        "greater than or equal to 1",
    ),
    ("etcd.endpoints", ["etcd:2379"], "spec.etcd.endpoints", "should match '^https?://"),
    ("etcd.joinTokenSecretRef", {"name": "Bad_Name"}, "spec.etcd.joinTokenSecretRef.name", "should match"),
    ("template.imagePullPolicy", "Sometimes", "spec.template.imagePullPolicy", "supported values"),
    (
        "template.resources.limits",
        {"nvidia.com/gpu": "lots"},
        "spec.template.resources.limits.nvidia.com/gpu",
        "should match",
    ),
]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("path", "value", "field", "message"), INVALID, ids=[f"{p}={v}" for p, v, _, _ in INVALID]
)
def test_the_api_server_rejects_bad_groups_naming_the_field(
    tg_crd: ControlPlane, path: str, value: Any, field: str, message: str
) -> None:
    obj = tg("bad")
    obj["spec"] = _spec_with(path, value)
    done = apply(tg_crd, obj, server_only=True)
    assert done.returncode != 0, f"accepted: {dump_yaml(obj['spec'])}"
    assert field in done.stderr and message in done.stderr, done.stderr


@pytest.mark.integration
def test_a_group_without_etcd_is_rejected(tg_crd: ControlPlane) -> None:
    obj = tg("noetcd")
    del obj["spec"]["etcd"]
    done = apply(tg_crd, obj, server_only=True)
    assert done.returncode != 0 and "spec.etcd" in done.stderr and "Required value" in done.stderr
    client = apply(tg_crd, obj)  # kubectl checks the published schema first, and says so too
    assert client.returncode != 0 and 'missing required field "etcd"' in client.stderr


@pytest.mark.integration
def test_kubectl_flags_unknown_fields_the_server_would_prune(tg_crd: ControlPlane) -> None:
    obj = tg("typo", replica=3)
    done = apply(tg_crd, obj)
    assert done.returncode != 0 and 'unknown field "replica"' in done.stderr


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"replicas": 10, "maxReplicas": 4}, "spec.replicas (10) must be between"),
        ({"replicas": 1, "minReplicas": 2}, "spec.replicas (1) must be between"),
        ({"replicas": 2, "experts": {"count": 8, "replication": 3}}, "spec.experts.replication (3)"),
        ({"replicas": 2, "roles": {"minPrefill": 2, "minDecode": 1}}, "minPrefill + minDecode (3)"),
        ({"fabric": {"bufferDevice": "cuda"}}, "bufferDevice is cuda but"),
        ({"storage": {"backend": "POSIX"}}, "spec.storage.path is needed"),
        ({"storage": {"backend": "OBJ", "params": {"region": "x"}}}, "params.bucket is needed"),
        ({"storage": {"backend": "OBJ", "params": {"bucket": "b", "secret_key": "s"}}}, "put it in a Secret"),
        ({"storage": {"backend": "GDS", "path": "/kv"}}, "the GDS backend needs GPUs"),
        (
            {"roles": {"policy": "load", "lowQueue": 9, "highQueue": 4}},
            "spec.roles.lowQueue (9) must be below",
        ),
        ({"engine": {"metricsUrl": "http://127.0.0.1:8000/metrics"}}, "set spec.engine.mode to sidecar"),
    ],
)
def test_cross_field_problems_are_sentences_naming_the_fields(spec: dict[str, Any], problem: str) -> None:
    full = {"etcd": {"endpoints": ["http://e:2379"], "joinTokenSecretRef": {"name": "t"}}, **spec}
    problems = cross_field_problems(TransferGroupSpec.model_validate(full))
    assert any(problem in p for p in problems), problems


def test_the_load_policy_reaches_the_members_settings() -> None:
    """roles.policy load is no longer refused: its settings go into agent.yaml, and a ratio
    group's file stays what it was (its config hash, and so its pods, unchanged)."""
    from weft.api.agent_settings import AgentSettings
    from weft.operator import children

    etcd = {"endpoints": ["http://e:2379"], "joinTokenSecretRef": {"name": "t"}}
    load = TransferGroupSpec.model_validate(
        {"etcd": etcd, "roles": {"policy": "load", "settleSeconds": 5, "ttftP90Ms": 800}}
    )
    assert cross_field_problems(load) == []
    planning = children.agent_config("g", "ns", load)["planning"]
    assert (planning["policy"], planning["settle_seconds"], planning["ttft_p90_ms"]) == ("load", 5.0, 800.0)
    settings = AgentSettings.model_validate(
        {
            **children.agent_config("g", "ns", load),
            "name": "g-0",
            "secret_file": None,
            "secret": "x" * 32,
            "advertise_host": "198.18.0.9",
        }
    )
    assert settings.planning.policy == "load" and settings.planning.ttft_p90_ms == 800.0
    ratio = children.agent_config("g", "ns", TransferGroupSpec.model_validate({"etcd": etcd}))
    assert set(ratio["planning"]) == {
        "ratio", "min_prefill", "min_decode", "experts", "replication", "redundant_slots", "gpu_less_roles"
    }  # fmt: skip


def test_a_sound_spec_has_no_cross_field_problems() -> None:
    spec = TransferGroupSpec.model_validate(
        {
            "replicas": 4,
            "experts": {"count": 16, "replication": 2},
            "fabric": {"bufferDevice": "cuda"},
            "template": {"resources": {"limits": {"nvidia.com/gpu": 1}}},
            "storage": {"backend": "OBJ", "params": {"bucket": "kv"}, "credentialsSecretRef": {"name": "s3"}},
            "etcd": {
                "endpoints": ["https://etcd-0:2379"],
                "joinTokenSecretRef": {"name": "t", "key": "token"},
            },
        }
    )
    assert cross_field_problems(spec) == []


@pytest.mark.integration
def test_objects_a_group_owns_are_garbage_collected_with_it(tg_crd: ControlPlane) -> None:
    """The fixture's controller-manager collects owned children (what the operator relies on)."""
    assert apply(tg_crd, tg("owner")).returncode == 0
    uid = tg_crd.kubectl("get", "tg", "owner", "-o", "jsonpath={.metadata.uid}")
    owned = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "owner-config",
            "ownerReferences": [
                {"apiVersion": "weft.dev/v1alpha1", "kind": "TransferGroup", "name": "owner", "uid": uid,
                 "controller": True, "blockOwnerDeletion": True}
            ],
        },
        "data": {"k": "v"},
    }  # fmt: skip
    assert apply(tg_crd, owned).returncode == 0
    tg_crd.kubectl("delete", "tg", "owner", "--wait=true", "--timeout=30s")
    deadline = time.monotonic() + 30
    while "owner-config" in tg_crd.kubectl("get", "configmaps", "-o", "name"):
        assert time.monotonic() < deadline, "the owned ConfigMap outlived its TransferGroup"
        time.sleep(0.2)


def _pod(**container: Any) -> dict[str, Any]:
    return {"containers": [{"name": "engine", "image": "e", **container}]}


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (
            {"template": {"image": "x", "tolerations": [], "spec": _pod()}},
            "spec.template.image, tolerations cannot be used with spec.template.spec: move them onto",
        ),
        ({"template": {"spec": {"containers": []}}}, "spec.template.spec.containers is empty"),
        (
            {"engine": {"container": "vllm"}, "template": {"spec": _pod()}},
            "spec.engine.container (vllm) names no container of spec.template.spec.containers (engine)",
        ),
        (
            {"template": {"spec": {**_pod(), "volumes": [{"name": "weft-x", "emptyDir": {}}]}}},
            "spec.template.spec.volumes[0].name (weft-x) starts with weft-",
        ),
        (
            {"template": {"spec": _pod(volumeMounts=[{"name": "weft-x", "mountPath": "/x"}])}},
            "spec.template.spec.containers[0].volumeMounts[0].name (weft-x) starts with weft-",
        ),
        (
            {"template": {"spec": _pod(ports=[{"name": "weft-p", "containerPort": 1}])}},
            "spec.template.spec.containers[0].ports[0].name (weft-p) starts with weft-",
        ),
        (
            {"template": {"spec": _pod(volumeMounts=[{"name": "c", "mountPath": "/etc/weft"}])}},
            "volumeMounts[0].mountPath (/etc/weft) is where weft mounts its settings",
        ),
        (
            {
                "template": {
                    "spec": _pod(volumeMounts=[{"name": "c", "mountPath": "/var/run/weft/join-token/"}])
                }
            },
            "mountPath (/var/run/weft/join-token/) is where weft mounts",
        ),
        (
            {"template": {"spec": _pod(ports=[{"containerPort": 8080}])}},
            "containers[0].ports[0] uses port 8080, which weft's agent listens on (weft-http)",
        ),
        (
            {
                "template": {
                    "spec": {"containers": [{"name": "a"}, {"name": "b", "ports": [{"containerPort": 7400}]}]}
                }
            },
            "spec.template.spec.containers[1].ports[0] uses port 7400",
        ),
        (
            {"engine": {"mode": "sidecar"}, "template": {"spec": {"containers": [{"name": "weft-agent"}]}}},
            "spec.template.spec.containers[0].name is weft-agent, the sidecar's name in mode sidecar",
        ),
        (
            {
                "fabric": {"bufferDevice": "cuda"},
                "template": {"spec": _pod(resources={"requests": {"cpu": 1}})},
            },
            "bufferDevice is cuda but spec.template.spec.containers[0].resources.limits (the engine's",
        ),
        (
            {"storage": {"backend": "GDS", "path": "/kv"}, "template": {"spec": _pod()}},
            "the GDS backend needs GPUs (spec.template.spec.containers[0].resources.limits",
        ),
    ],
)
def test_template_problems_name_the_field(spec: dict[str, Any], problem: str) -> None:
    full = {"etcd": {"endpoints": ["http://e:2379"], "joinTokenSecretRef": {"name": "t"}}, **spec}
    problems = cross_field_problems(TransferGroupSpec.model_validate(full))
    assert any(problem in p for p in problems), problems


def test_a_gpu_engine_template_with_cuda_buffers_is_sound() -> None:
    gpu = {"limits": {"nvidia.com/gpu": 1}}
    spec = {
        "etcd": {"endpoints": ["http://e:2379"], "joinTokenSecretRef": {"name": "t"}},
        "fabric": {"bufferDevice": "cuda"},
        "engine": {"container": "vllm", "mode": "sidecar"},
        "template": {"spec": {"containers": [{"name": "side"}, {"name": "vllm", "resources": gpu}]}},
    }
    assert cross_field_problems(TransferGroupSpec.model_validate(spec)) == []


# -- spec.template.spec: a PodSpec with the API server's own schema ------------------------------


def test_the_crd_fits_kubectl_apply() -> None:
    """kubectl apply keeps the whole object in an annotation, which may not pass 262144 bytes."""
    assert len(json.dumps(crd_manifest(), separators=(",", ":"))) < 262144 // 2


def test_the_pod_schema_refuses_recursion_and_dangling_references() -> None:
    loop = {"definitions": {podschema.POD_SPEC: {"properties": {"a": {"$ref": "#/definitions/A"}}},
                            "A": {"properties": {"b": {"$ref": "#/definitions/A"}}}}}  # fmt: skip
    with pytest.raises(podschema.PodSchemaError, match=r"recursive definition .*: A -> A"):
        podschema.pod_spec_schema(loop)
    dangling = {"definitions": {podschema.POD_SPEC: {"properties": {"a": {"$ref": "#/definitions/B"}}}}}
    with pytest.raises(podschema.PodSchemaError, match="missing definition B"):
        podschema.pod_spec_schema(dangling)
    with pytest.raises(podschema.PodSchemaError, match="no definition"):
        podschema.pod_spec_schema({"definitions": {}})


def test_the_pod_schema_converts_what_a_structural_schema_cannot_say() -> None:
    doc = {
        "definitions": {
            podschema.POD_SPEC: {
                "description": "dropped",
                "properties": {
                    "q": {"$ref": "#/definitions/io.k8s.apimachinery.pkg.api.resource.Quantity"},
                    "p": {"type": "string", "format": "int-or-string"},
                    "l": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "map",
                          "x-kubernetes-patch-strategy": "merge"},
                    "o": {"description": "no type"},
                },
            }
        }
    }  # fmt: skip
    int_or_string = {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}
    assert podschema.pod_spec_schema(doc) == {
        "type": "object",
        "properties": {
            "l": {"type": "array", "items": {"type": "string"}},
            "o": {"type": "object"},
            "p": int_or_string,
            "q": int_or_string,
        },
    }


@pytest.mark.integration
def test_the_committed_pod_schema_is_the_api_servers_own(control_plane: ControlPlane) -> None:
    """weft/api/podspec.json is derived from the live API's /openapi/v2 (`weft crds
    --pod-schema-from`), not written by hand."""
    openapi = json.loads(control_plane.kubectl("get", "--raw", "/openapi/v2", timeout=120))
    committed = podschema.load()
    assert committed["kubernetesVersion"] == openapi["info"]["version"] == "v1.20.2"
    assert committed["schema"] == podschema.pod_spec_schema(openapi)


VLLM_POD: dict[str, Any] = {
    "serviceAccountName": "vllm",
    "priorityClassName": "system-cluster-critical",
    "runtimeClassName": "nvidia",
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
    "affinity": {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"app": "vllm"}},
                    },
                }
            ]
        }
    },
    "initContainers": [
        {
            "name": "fetch",
            "image": "busybox:1.36",
            "command": ["sh", "-c", "echo fetch"],
            "volumeMounts": [{"name": "models", "mountPath": "/models"}],
        }
    ],
    "containers": [
        {
            "name": "vllm",
            "image": "vllm/vllm-openai:v0.6.3",
            "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
            "args": ["--model", "/models/llama", "--port", "8000"],
            "env": [
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                {"name": "MY_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "VLLM_LOGGING_LEVEL", "value": "INFO"},
            ],
            "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
            "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "32Gi"}, "requests": {"cpu": "500m"}},
            "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5},
            "livenessProbe": {"httpGet": {"path": "/health", "port": 8000}, "initialDelaySeconds": 60},
            "startupProbe": {"tcpSocket": {"port": 8000}, "failureThreshold": 60},
            "volumeMounts": [
                {"name": "models", "mountPath": "/models", "readOnly": True},
                {"name": "dshm", "mountPath": "/dev/shm"},
            ],
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        }
    ],
    "volumes": [
        {"name": "models", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
    ],
}


@pytest.mark.integration
def test_a_realistic_engine_template_is_accepted_and_stored_whole(tg_crd: ControlPlane) -> None:
    done = apply(tg_crd, tg("vllm", template={"metadata": {"labels": {"app": "vllm"}}, "spec": VLLM_POD}))
    assert done.returncode == 0, done.stderr
    stored = json.loads(tg_crd.kubectl("get", "tg", "vllm", "-o", "json"))["spec"]
    assert stored["template"]["spec"] == VLLM_POD  # nothing pruned, nothing defaulted into it
    assert set(stored["template"]) == {"metadata", "spec"}  # no legacy default slipped in
    assert cross_field_problems(TransferGroupSpec.model_validate(stored)) == []
    tg_crd.kubectl("delete", "tg", "vllm")


# Kubernetes 1.20's CRD validation names a field inside a list without its index
# (spec.template.spec.containers.name, not containers[0].name).
BAD_TEMPLATES = [
    ({"containers": [{"image": "x"}]}, "spec.template.spec.containers.name: Required value", ""),
    ({"containers": "x"}, "spec.template.spec.containers", "must be of type array"),
    ({"volumes": []}, "spec.template.spec.containers", "Required value"),
    (
        {"containers": [{"name": "a", "readinessProbe": {"periodSeconds": "often"}}]},
        "spec.template.spec.containers.readinessProbe.periodSeconds",
        "must be of type integer",
    ),
    (
        {"containers": [{"name": "a", "ports": [{"containerPort": "http"}]}]},
        "spec.template.spec.containers.ports.containerPort",
        "must be of type integer",
    ),
    (
        {"containers": [{"name": "a", "env": [{"value": "v"}]}]},
        "spec.template.spec.containers.env.name: Required value",
        "",
    ),
]


@pytest.mark.integration
@pytest.mark.parametrize(("pod", "field", "message"), BAD_TEMPLATES, ids=[f for _, f, _ in BAD_TEMPLATES])
def test_the_api_server_rejects_bad_pod_templates_naming_the_field(
    tg_crd: ControlPlane, pod: dict[str, Any], field: str, message: str
) -> None:
    done = apply(tg_crd, tg("badpod", template={"spec": pod}), server_only=True)
    assert done.returncode != 0, "accepted"
    assert field in done.stderr and message in done.stderr, done.stderr


@pytest.mark.integration
def test_a_legacy_template_still_validates_and_gets_no_new_defaults(tg_crd: ControlPlane) -> None:
    legacy = {
        "image": "reg/weft:1",
        "resources": {"limits": {"nvidia.com/gpu": 1}},
        "nodeSelector": {"a": "b"},
    }
    done = apply(tg_crd, tg("legacy", template=legacy))
    assert done.returncode == 0, done.stderr
    stored = json.loads(tg_crd.kubectl("get", "tg", "legacy", "-o", "json"))["spec"]
    assert stored["template"] == legacy and stored["engine"]["mode"] == "embedded"
    assert cross_field_problems(TransferGroupSpec.model_validate(stored)) == []
    tg_crd.kubectl("delete", "tg", "legacy")


def test_weft_crds_regenerates_the_pod_schema_from_a_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = {"info": {"version": "unversioned"}, "definitions": {podschema.POD_SPEC: {"properties": {}}}}
    source, out, crd = tmp_path / "swagger.json", tmp_path / "podspec.json", tmp_path / "tg.yaml"
    source.write_text(json.dumps(doc))
    args = ["crds", "-o", str(crd), "--pod-schema-from", str(source), "--pod-schema-output", str(out)]
    assert cli.main(args) == cli.EXIT_FAILED  # "unversioned": the version must be given
    assert "--kubernetes-version" in capsys.readouterr().err and not out.exists()
    assert cli.main([*args, "--kubernetes-version", "v9.9.9"]) == cli.EXIT_OK
    written = json.loads(out.read_text())
    assert written == {"kubernetesVersion": "v9.9.9", "definition": podschema.POD_SPEC,
                       "schema": {"type": "object", "properties": {}}}  # fmt: skip
    assert crd.read_text() == crd_yaml()
