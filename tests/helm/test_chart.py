"""The Helm chart: lint, schema, and every rendered manifest validated by a real kube-apiserver
(what `make helm-lint` runs)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from e2e import chart
from tests.k8s_fixtures import control_plane  # noqa: F401  (fixture)
from weft.testing.controlplane import ControlPlane

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("variant", list(chart.VARIANTS))
def test_every_variant_lints_and_validates(control_plane: ControlPlane, variant: str) -> None:  # noqa: F811
    assert chart.check(chart.VARIANTS[variant], control_plane.kubectl) == []


def test_the_api_server_refuses_what_the_schemas_do_not_allow(control_plane: ControlPlane) -> None:  # noqa: F811
    manifests = chart.render({})
    deploy = next(m for m in manifests if m.doc["kind"] == "Deployment")
    unknown = copy.deepcopy(deploy.doc)
    unknown["spec"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "Never"
    wrong_type = copy.deepcopy(deploy.doc)
    wrong_type["spec"]["replicas"] = "two"
    bad_tg = {
        "apiVersion": "weft.dev/v1alpha1",
        "kind": "TransferGroup",
        "metadata": {"name": "bad", "namespace": chart.NAMESPACE},
        "spec": {
            "replicas": -1,
            "etcd": {"endpoints": ["http://e:2379"], "joinTokenSecretRef": {"name": "t"}},
        },
    }
    crds = [m for m in manifests if m.doc["kind"] == "CustomResourceDefinition"]
    problems = chart.validate(
        [
            *crds,
            chart.Manifest("unknown", unknown),
            chart.Manifest("type", wrong_type),
            chart.Manifest("tg", bad_tg),
        ],
        control_plane.kubectl,
    )
    assert len(problems) == 3, problems
    assert "imagePulPolicy" in problems[0]
    assert "replicas" in problems[1]
    assert "spec.replicas" in problems[2]


@pytest.mark.parametrize(
    ("values", "word"),
    [
        ({"etcd": {"replicas": 2}}, "replicas"),
        ({"joinToken": {"value": "short"}}, "value"),
        ({"etcd": {"enabled": False}}, "endpoints"),
        ({"operator": {"logLevel": "LOUD"}}, "logLevel"),
        ({"imagee": {}}, "imagee"),
        ({"etcd": {"external": {"endpoints": ["etcd:2379"]}}}, "endpoints"),
    ],
)
def test_bad_values_are_refused_by_the_schema(values: dict[str, object], word: str) -> None:
    with pytest.raises(chart.ChartError, match=word):
        chart.render(values)


def test_chart_defaults_render_what_users_need() -> None:
    kinds = sorted({m.doc["kind"] for m in chart.render({})})
    assert kinds == sorted(
        {
            "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Deployment", "NetworkPolicy",
            "Secret", "Service", "ServiceAccount", "StatefulSet",
        }
    )  # fmt: skip
    secret = next(m.doc for m in chart.render({}) if m.doc["metadata"]["name"] == "weft-join-token")
    assert len(secret["data"]["token"]) >= 48  # base64 of 48 random characters
    namespaced = chart.render({"operator": {"watchNamespaces": ["a", "b"]}})
    roles = [m.doc for m in namespaced if m.doc["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["a", "b"]
    assert not any("secrets" in r["resources"] and "list" in r["verbs"] for r in roles[0]["rules"])
    args = next(m.doc for m in namespaced if m.doc["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert "--namespace=a" in args and "--all-namespaces" not in args


def test_chart_crds_are_the_generated_ones() -> None:
    for name in ("transfergroup.yaml", "kopf-peering.yaml"):
        assert (ROOT / "helm/weft/crds" / name).read_text() == (ROOT / "crds" / name).read_text(), (
            f"helm/weft/crds/{name} differs from crds/{name}: copy it (make crds)"
        )


# what the operator's code calls on the API (weft/operator): resource -> verbs
OPERATOR_NEEDS = {
    ("weft.dev", "transfergroups"): {"get", "list", "watch", "patch"},
    ("weft.dev", "transfergroups/status"): {"get", "patch"},
    ("weft.dev", "transfergroups/scale"): {"get", "patch"},  # the autoscaler writes through /scale
    ("apps", "statefulsets"): {"get", "create", "patch"},
    ("", "secrets"): {"get"},
    ("networking.k8s.io", "networkpolicies"): {"get", "create", "patch"},  # each group's (chart default)
}


@pytest.mark.parametrize("values", [{}, {"operator": {"watchNamespaces": ["a"]}}])
def test_the_operator_s_role_allows_what_it_calls(values: dict[str, object]) -> None:
    rules = [
        r for m in chart.render(values) if m.doc["kind"] in ("ClusterRole", "Role") for r in m.doc["rules"]
    ]
    for (group, resource), verbs in OPERATOR_NEEDS.items():
        granted = {
            v for r in rules if group in r["apiGroups"] and resource in r["resources"] for v in r["verbs"]
        }
        assert verbs <= granted, f"{group}/{resource}: needs {sorted(verbs - granted)}"
