"""The Helm chart `helm/weft`: render, lint and validate it with Helm's own Go SDK
(`helm-python-sdk`, no helm binary), and install it for real.

Validation goes past `helm lint`: every manifest the chart renders, for each value set in
`VARIANTS`, is sent to a real kube-apiserver 1.20 (`weft.testing.controlplane`) as a
server-side dry run with kubectl's schema validation on, so unknown fields, wrong types and
anything the API server's own validation refuses fail the check. The CRDs are applied first,
so the example TransferGroup is checked against the CRD's schema too.

    python -m e2e.chart lint        # `make helm-lint`
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "weft"
KUBE_VERSION = "v1.20.2"  # the API server the chart is checked against (scripts/k8s-build.sh)
RELEASE, NAMESPACE = "weft", "weft-system"

# value sets every check renders: the defaults and each switch a user is likely to flip
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "insecure-etcd": {"etcd": {"tls": {"enabled": False}}, "networkPolicy": {"enabled": False}},
    "etcd-at-a-fixed-ip": {"etcd": {"clusterIP": "198.19.0.250"}, "operator": {"replicas": 1}},
    "external-etcd": {"etcd": {"enabled": False, "external": {"endpoints": ["https://etcd.example:2379"]}}},
    "namespaced": {"operator": {"watchNamespaces": ["team-a", "team-b"], "replicas": 2}},
    "etcd-ha-tls-persistent": {
        "etcd": {"replicas": 3, "tls": {"existingSecret": "etcd-tls"}, "persistence": {"enabled": True}}
    },
    "existing-token-no-rbac": {
        "joinToken": {"existingSecret": "my-token"},
        "rbac": {"create": False},
        "serviceAccount": {"create": False, "name": "ops"},
    },
    "example-group": {
        "exampleGroup": {
            "enabled": True,
            "spec": {"replicas": 3, "roles": {"ratio": "1:2"}, "template": {"image": "weft-agent:0.1.0"}},
        },
        "joinToken": {"value": "0123456789abcdef0123"},
    },
}


class ChartError(Exception):
    """The chart failed a check; the message says which and why."""


@dataclass(frozen=True)
class Manifest:
    source: str  # template path
    doc: dict[str, Any]

    @property
    def what(self) -> str:
        meta = self.doc.get("metadata") or {}
        return f"{self.doc.get('kind')} {meta.get('namespace', '')}/{meta.get('name')} ({self.source})"


def load() -> helm.Chart:
    return helm.Chart.load(CHART)


def render(
    values: Mapping[str, Any] | None = None, *, name: str = RELEASE, namespace: str = NAMESPACE
) -> list[Manifest]:
    """The chart's objects for `values` (schema-checked first), CRDs first, in file order.

    Raises:
        ChartError: the values break values.schema.json, or a template fails.
    """
    chart = load()
    try:
        chart.validate_schema(dict(values or {}))
        rendered = chart.render(dict(values or {}), name=name, namespace=namespace, is_install=True)
        crds = chart.crds
    except helm.HelmError as exc:
        raise ChartError(str(exc)) from exc
    out = [Manifest(c["name"], d) for c in crds for d in _load_all(c["data"]) if d]
    for path in sorted(rendered):
        if not path.endswith((".yaml", ".yml")):
            continue
        out.extend(Manifest(path, d) for d in _load_all(rendered[path]) if d)
    return out


def _load_all(text: str) -> list[Any]:
    """YAML documents, with libyaml's parser where PyYAML has it (the CRDs are thousands of
    lines, parsed once per variant)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return list(yaml.load_all(text, Loader=loader))


def lint(values: Mapping[str, Any] | None = None) -> list[str]:
    """`helm lint --strict` against `KUBE_VERSION`: its warnings and errors (info is dropped)."""
    report = helm.lint(CHART, dict(values or {}), strict=True, kube_version=KUBE_VERSION)
    problems = [f"{m['path']}: {m['error']}" for m in report.get("messages", []) if m["severity"] >= 2]
    return problems + list(report.get("errors") or [])


def validate(manifests: list[Manifest], kubectl: Any) -> list[str]:
    """Each manifest, server-side dry run with schema validation, against the API server
    `kubectl` (`ControlPlane.kubectl`: raises CalledProcessError on failure) talks to. CRDs
    are applied for real (the custom objects need them); namespaces are created. Returns the
    refusals."""
    problems: list[str] = []
    crds = [m for m in manifests if m.doc.get("kind") == "CustomResourceDefinition"]
    for m in crds:
        kubectl("apply", "-f", "-", input=json.dumps(m.doc))
    for m in crds:
        kubectl("wait", "--for=condition=Established", "--timeout=30s", f"crd/{m.doc['metadata']['name']}")
    namespaces = {str((m.doc.get("metadata") or {}).get("namespace")) for m in manifests} - {"None"}
    for ns in sorted(namespaces):
        kubectl("create", "namespace", ns, check=False)
    for m in manifests:
        if m in crds:
            continue
        try:
            kubectl(
                "create",
                "--dry-run=server",
                "--validate=true",
                "-o",
                "name",
                "-f",
                "-",
                input=json.dumps(m.doc),
            )
        except subprocess.CalledProcessError as exc:
            problems.append(f"{m.what}: {(exc.stderr or exc.stdout or '').strip()}")
    return problems


def check(values: Mapping[str, Any], kubectl: Any) -> list[str]:
    """Lint, render and validate one value set; its problems (empty: all good)."""
    try:
        return lint(values) + validate(render(values), kubectl)
    except ChartError as exc:
        return [str(exc)]


def check_all(kubectl: Any) -> dict[str, list[str]]:
    """Lint, render and validate every variant; the problems, by variant (empty: all good)."""
    return {variant: check(values, kubectl) for variant, values in VARIANTS.items()}


def _control_plane() -> Iterator[Any]:
    from weft.testing.controlplane import ControlPlane

    with tempfile.TemporaryDirectory(prefix="weft-helm-") as tmp, ControlPlane(Path(tmp)) as plane:
        yield plane


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.chart", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("lint", help="lint, render and validate every variant against kube-apiserver")
    r = sub.add_parser("render", help="print the manifests of a variant")
    r.add_argument("variant", choices=sorted(VARIANTS))
    args = parser.parse_args(argv)
    if args.command == "render":
        print(yaml.safe_dump_all([m.doc for m in render(VARIANTS[args.variant])], sort_keys=False))
        return 0
    for plane in _control_plane():
        found = check_all(plane.kubectl)
    bad = 0
    for variant, problems in found.items():
        print(f"{variant}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        for p in problems:
            print(f"  - {p}")
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())


def install(
    kubeconfig: Path,
    values: Mapping[str, Any],
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    timeout: int = 300,
) -> dict[str, Any]:
    """`helm install` of the chart for real, through Helm's Go SDK (no helm binary): the
    namespace is created, and the call returns once Helm's watcher sees every object ready.

    Raises:
        ChartError: the values or the install failed (the message is Helm's).
    """
    try:
        with helm.Config(kubeconfig_path=kubeconfig, namespace=namespace) as config:
            release_info = config.install(
                load(), release, dict(values), namespace=namespace, create_namespace=True,
                wait="watcher", timeout=timeout,
            )  # fmt: skip
    except helm.HelmError as exc:
        raise ChartError(f"helm install {release}: {exc}") from exc
    return dict(release_info)


def uninstall(kubeconfig: Path, *, release: str = RELEASE, namespace: str = NAMESPACE) -> None:
    with helm.Config(kubeconfig_path=kubeconfig, namespace=namespace) as config:
        config.uninstall(release)
