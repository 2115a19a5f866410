"""A real Kubernetes control plane for the operator's tests (kube-apiserver 1.20.2 from Debian's
source, built once by scripts/k8s-build.sh and cached outside the repository).

Without the binaries the tests that need them skip, except on CI (`CI=true`), where a missing
control plane is a broken set-up and fails them (`make test` builds them first).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from weft.fabric.errors import ConfigError
from weft.testing.controlplane import ControlPlane, find_binaries

CRD_FILE = Path(__file__).resolve().parent.parent / "crds" / "transfergroup.yaml"


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + kube-controller-manager on loopback, for the whole session."""
    try:
        find_binaries()
    except ConfigError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    plane = ControlPlane(tmp_path_factory.mktemp("k8s"))
    try:
        plane.start()
    except ConfigError as exc:
        plane.close()
        pytest.fail(str(exc))
    try:
        yield plane
    finally:
        plane.close()


@pytest.fixture(scope="session")
def tg_crd(control_plane: ControlPlane) -> ControlPlane:
    """The control plane with crds/transfergroup.yaml applied and established."""
    control_plane.kubectl("apply", "-f", str(CRD_FILE))
    # not `kubectl wait`: 1.20's fails at once ("<nil> is of the type <nil>") when it reads the
    # CRD before the API server wrote its first conditions
    established = '{.status.conditions[?(@.type=="Established")].status}'
    deadline = time.monotonic() + 60
    while (
        control_plane.kubectl(
            "get", "crd", "transfergroups.weft.dev", "-o", f"jsonpath={established}", check=False
        )
        != "True"
    ):
        if time.monotonic() > deadline:
            pytest.fail("the TransferGroup CRD never became Established")
        time.sleep(0.2)
    deadline = time.monotonic() + 30  # discovery catches up a moment after Established
    while "transfergroups" not in control_plane.kubectl("api-resources", "--api-group=weft.dev", check=False):
        if time.monotonic() > deadline:
            pytest.fail("the TransferGroup resource never appeared in discovery")
        time.sleep(0.2)
    return control_plane
