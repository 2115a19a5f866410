"""The chart is secure by default: etcd speaks TLS and wants client certificates made at
install (kept across upgrades), the agents and the operator get only the client certificate,
NetworkPolicies fence etcd, and the insecure mode is an explicit value with a warning.

NetworkPolicies are checked for what can be checked without a CNI that enforces them (the
e2e cluster's bridge plugin does not): the API server takes them, and their selectors match
the labels of the pods they are meant to admit."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest

from e2e import chart
from tests.k8s_fixtures import control_plane  # noqa: F401  (fixture)
from weft.operator import children
from weft.testing.controlplane import ControlPlane

FULL = chart.RELEASE  # the release's full name with the default values


def docs(values: dict[str, Any]) -> list[dict[str, Any]]:
    return [m.doc for m in chart.render(values)]


def named(found: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in found if d["kind"] == kind and d["metadata"]["name"] == name)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels, matchExpressions In/Exists) against a pod's labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions") or []:
        if e["operator"] == "Exists" and e["key"] not in labels:
            return False
        if e["operator"] == "In" and labels.get(e["key"]) not in e["values"]:
            return False
    return True


def openssl(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        ["openssl", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def write_secret(secret: dict[str, Any], into: Path, prefix: str) -> None:
    for key, value in secret["data"].items():
        (into / f"{prefix}-{key}").write_bytes(base64.b64decode(value))


def test_the_default_etcd_speaks_tls_and_requires_client_certificates() -> None:
    found = docs({})
    sts = named(found, "StatefulSet", f"{FULL}-etcd")
    pod = sts["spec"]["template"]["spec"]
    env = env_of(pod["containers"][0])
    assert env["ETCD_LISTEN_CLIENT_URLS"].startswith("https://")
    assert env["ETCD_ADVERTISE_CLIENT_URLS"].startswith("https://")
    assert env["ETCD_CLIENT_CERT_AUTH"] == "true"
    assert env["ETCD_TRUSTED_CA_FILE"] == "/etc/etcd/tls/ca.crt"
    assert {env["ETCD_CERT_FILE"], env["ETCD_KEY_FILE"]} == {"/etc/etcd/tls/tls.crt", "/etc/etcd/tls/tls.key"}
    # etcd mounts the server Secret, nothing else mounts it, and nobody mounts the CA's
    volume = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == f"{FULL}-etcd-server"
    operator = named(found, "Deployment", f"{FULL}-operator")["spec"]["template"]["spec"]
    assert "secret" not in json.dumps(operator.get("volumes"))


def test_the_certificates_chain_to_the_ca_and_name_what_clients_dial(tmp_path: Path) -> None:
    found = docs({"etcd": {"clusterIP": "198.19.0.250"}})
    ca = named(found, "Secret", f"{FULL}-etcd-ca")
    server = named(found, "Secret", f"{FULL}-etcd-server")
    client = named(found, "Secret", f"{FULL}-etcd-client")
    assert {s["type"] for s in (ca, server, client)} == {"kubernetes.io/tls"}
    assert set(server["data"]) == set(client["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    assert server["data"]["ca.crt"] == client["data"]["ca.crt"] == ca["data"]["tls.crt"]
    for secret, prefix in ((ca, "ca"), (server, "server"), (client, "client")):
        write_secret(secret, tmp_path, prefix)
    for prefix in ("server", "client"):
        assert "OK" in openssl("verify", "-CAfile", "ca-tls.crt", f"{prefix}-tls.crt", cwd=tmp_path)
    text = openssl("x509", "-in", "server-tls.crt", "-noout", "-text", cwd=tmp_path)
    for name in (f"DNS:{FULL}-etcd.{chart.NAMESPACE}.svc", "IP Address:198.19.0.250", "IP Address:127.0.0.1"):
        assert name in text
    assert "TLS Web Client Authentication" in openssl(
        "x509", "-in", "client-tls.crt", "-noout", "-text", cwd=tmp_path
    )


def test_groups_are_told_https_and_the_client_secret() -> None:
    found = docs(
        {"exampleGroup": {"enabled": True, "spec": {"replicas": 2}}, "etcd": {"clusterIP": "198.19.0.250"}}
    )
    group = next(d for d in found if d["kind"] == "TransferGroup")
    assert group["spec"]["etcd"]["tlsSecretRef"] == {"name": f"{FULL}-etcd-client"}
    assert group["spec"]["etcd"]["endpoints"] == ["https://198.19.0.250:2379"]
    by_dns = next(d for d in docs({"exampleGroup": {"enabled": True}}) if d["kind"] == "TransferGroup")
    assert by_dns["spec"]["etcd"]["endpoints"] == [f"https://{FULL}-etcd.{chart.NAMESPACE}.svc:2379"]


def test_the_operator_runs_two_replicas_that_name_their_peering_record_after_the_pod() -> None:
    deploy = named(docs({}), "Deployment", f"{FULL}-operator")
    assert deploy["spec"]["replicas"] == 2
    env = env_of(deploy["spec"]["template"]["spec"]["containers"][0])
    assert env["POD_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["WEFT_NETWORK_POLICIES"] == "true"


def test_the_etcd_network_policy_admits_the_operator_and_group_pods_only() -> None:
    found = docs({})
    policy = named(found, "NetworkPolicy", f"{FULL}-etcd")["spec"]
    etcd_pod = named(found, "StatefulSet", f"{FULL}-etcd")["spec"]["template"]["metadata"]["labels"]
    operator_pod = named(found, "Deployment", f"{FULL}-operator")["spec"]["template"]["metadata"]["labels"]
    group_pod = children.labels("llama")  # what the operator gives a group's pods
    assert matches(policy["podSelector"], etcd_pod)
    assert policy["policyTypes"] == ["Ingress"]
    clients, peers = policy["ingress"]
    assert clients["ports"] == [{"protocol": "TCP", "port": 2379}]
    assert peers["ports"] == [{"protocol": "TCP", "port": 2380}]
    admitted = clients["from"]
    assert any(matches(f["podSelector"], operator_pod) and "namespaceSelector" not in f for f in admitted)
    assert any(matches(f["podSelector"], group_pod) and f.get("namespaceSelector") == {} for f in admitted)
    # not: an arbitrary pod, the etcd pods on the client port, a pod of another release's operator
    stranger = {"app": "debug"}
    other_operator = {**operator_pod, "app.kubernetes.io/instance": "other"}
    for labels in (stranger, other_operator):
        assert not any(matches(f["podSelector"], labels) for f in admitted)
    assert [matches(f["podSelector"], etcd_pod) for f in peers["from"]] == [True]


def test_the_insecure_mode_is_explicit_and_warned_about() -> None:
    values = {"etcd": {"tls": {"enabled": False}}, "networkPolicy": {"enabled": False}}
    found = docs(values)
    assert not [d for d in found if d["kind"] == "NetworkPolicy"]
    assert [d["metadata"]["name"] for d in found if d["kind"] == "Secret"] == [f"{FULL}-join-token"]
    env = env_of(named(found, "StatefulSet", f"{FULL}-etcd")["spec"]["template"]["spec"]["containers"][0])
    assert env["ETCD_LISTEN_CLIENT_URLS"].startswith("http://") and "ETCD_CLIENT_CERT_AUTH" not in env
    deploy = named(found, "Deployment", f"{FULL}-operator")
    assert "WEFT_NETWORK_POLICIES" not in env_of(deploy["spec"]["template"]["spec"]["containers"][0])
    notes = notes_for(values)
    assert "WARNING: etcd runs WITHOUT TLS" in notes and "WARNING: networkPolicy.enabled=false" in notes
    assert "WARNING" not in notes_for({})


def notes_for(values: dict[str, Any]) -> str:
    rendered = chart.load().render(values, name=chart.RELEASE, namespace=chart.NAMESPACE, is_install=True)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def test_a_user_s_secret_replaces_the_generated_certificates() -> None:
    found = docs({"etcd": {"tls": {"existingSecret": "my-etcd-tls"}}})
    assert [d["metadata"]["name"] for d in found if d["kind"] == "Secret"] == [f"{FULL}-join-token"]
    pod = named(found, "StatefulSet", f"{FULL}-etcd")["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "tls")["secret"]["secretName"] == "my-etcd-tls"


@pytest.mark.integration
def test_an_upgrade_keeps_the_certificates_and_the_api_server_takes_the_policies(
    control_plane: ControlPlane,  # noqa: F811
) -> None:
    """A real `helm install` then `helm upgrade` (Helm's Go SDK, `lookup` against the API
    server): the CA, server and client certificates are the ones of the install."""
    release, ns = "sec", "weft-upgrade"
    names = [f"{release}-weft-etcd-{what}" for what in ("ca", "server", "client")]

    def secrets() -> dict[str, Any]:
        return {
            n: json.loads(control_plane.kubectl("-n", ns, "get", "secret", n, "-o", "json"))["data"]
            for n in names
        }

    values = {"exampleGroup": {"enabled": True}}
    with helm.Config(kubeconfig_path=control_plane.kubeconfig, namespace=ns) as config:
        config.install(chart.load(), release, values, namespace=ns, create_namespace=True, timeout=120)
        try:
            installed = secrets()
            config.upgrade(
                chart.load(),
                release,
                {**values, "operator": {"logLevel": "DEBUG"}},
                namespace=ns,
                timeout=120,
            )
            assert secrets() == installed
            # a client Secret deleted by hand comes back, signed by the same CA
            control_plane.kubectl("-n", ns, "delete", "secret", names[2])
            config.upgrade(chart.load(), release, values, namespace=ns, timeout=120)
            again = secrets()
            assert again[names[0]] == installed[names[0]] and again[names[1]] == installed[names[1]]
            assert again[names[2]]["ca.crt"] == installed[names[0]]["tls.crt"]
            assert again[names[2]]["tls.crt"] != installed[names[2]]["tls.crt"]
            policy = control_plane.kubectl(
                "-n", ns, "get", "networkpolicy", f"{release}-weft-etcd", "-o", "name"
            )
            assert policy.strip() == f"networkpolicy.networking.k8s.io/{release}-weft-etcd"
        finally:
            config.uninstall(release)
