"""What a scenario needs from a cluster: the `Driver` protocol, implemented by the `local`
driver (`e2e.local`: a real single-node cluster built from Debian's packages) and the `kind`
driver (`e2e.kind`). Scenarios (`e2e.scenarios`) only talk to this."""

from __future__ import annotations

import base64
import json
import signal
import time
from dataclasses import dataclass
from typing import Any, Protocol

from weft.operator import children

RELEASE = "weft"  # the chart's release: names the etcd Service and the join-token Secret
ETCD_SERVICE = f"{RELEASE}-etcd"
TOKEN_SECRET = f"{RELEASE}-join-token"


@dataclass(frozen=True)
class Pod:
    """A running container of the group (an agent) or of the release (operator, etcd)."""

    name: str
    ip: str
    container: str  # the runtime's container id
    ready: bool
    restarts: int


class Driver(Protocol):
    name: str
    namespace: str  # where the release and the TransferGroup live
    group: str  # the TransferGroup's name

    def up(self) -> None:
        """Cluster up, images loaded, chart installed, TransferGroup applied, agents ready."""

    def down(self) -> None:
        """Everything `up` made, removed (processes, containers, bridges, rules)."""

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60.0) -> str:
        """kubectl against the cluster; stdout (raises CalledProcessError when `check`)."""

    def etcd_endpoint(self) -> str:
        """An etcd client URL the host (where scenarios run) can dial."""

    def join_token(self) -> bytes: ...

    def pods(self, component: str) -> list[Pod]:
        """``agent``, ``operator`` or ``etcd`` pods, by name."""

    def signal(self, pod: Pod, sig: signal.Signals) -> None:
        """Send `sig` to the pod's main process (SIGKILL, SIGSTOP, SIGCONT)."""

    def partition(self, pod: Pod, on: bool) -> None:
        """Cut the pod off the network (everything but loopback), or heal it."""

    def group_status(self) -> dict[str, Any]:
        """The TransferGroup's status, as the API has it."""

    def scale(self, replicas: int) -> None: ...


class KubeDriver:
    """What both drivers do the same way, through kubectl."""

    namespace: str
    group: str
    replicas: int

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60.0) -> str:
        raise NotImplementedError

    def wait_agents_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            agents = self.pods("agent")
            if len(agents) == self.replicas and all(p.ready for p in agents):
                return
            if time.monotonic() > deadline:
                ready = sum(p.ready for p in agents)
                raise TimeoutError(
                    f"{ready}/{self.replicas} agents ready after {timeout:.0f}s "
                    f"({len(agents)} pods); group status: {self.group_status()}"
                )
            time.sleep(2.0)

    def join_token(self) -> bytes:
        data = self.kubectl(
            "get", "secret", TOKEN_SECRET, "-n", self.namespace, "-o", "jsonpath={.data.token}"
        )
        return base64.b64decode(data)

    def pods(self, component: str) -> list[Pod]:
        selectors = {
            "agent": children.selector_string(self.group),
            "operator": "app.kubernetes.io/component=operator",
            "etcd": "app.kubernetes.io/component=etcd",
        }
        found = json.loads(
            self.kubectl("get", "pods", "-n", self.namespace, "-l", selectors[component], "-o", "json")
        )
        return sorted((_pod(item) for item in found["items"]), key=lambda p: p.name)

    def group_status(self) -> dict[str, Any]:
        found = json.loads(
            self.kubectl("get", "transfergroup", self.group, "-n", self.namespace, "-o", "json")
        )
        status: dict[str, Any] = found.get("status") or {}
        return status

    def scale(self, replicas: int) -> None:
        self.kubectl("scale", f"transfergroup/{self.group}", "-n", self.namespace, f"--replicas={replicas}")


AGENT_CONTAINER = "weft-agent"
"""The sidecar's container (engine pods); faults aimed at "the agent" go to it."""


def _pod(item: dict[str, Any]) -> Pod:
    """A Pod from the API's pod object, by its agent: the ``weft-agent`` sidecar of an
    engine pod, else its first (main) container."""
    status = item.get("status") or {}
    names = [c["name"] for c in item["spec"]["containers"]]
    main = AGENT_CONTAINER if AGENT_CONTAINER in names else names[0]
    container: dict[str, Any] = next(
        (c for c in status.get("containerStatuses") or [] if c["name"] == main), {}
    )
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or [])
    return Pod(
        name=item["metadata"]["name"],
        ip=status.get("podIP") or "",
        container=str(container.get("containerID") or "").split("://", 1)[-1],
        ready=ready,
        restarts=int(container.get("restartCount") or 0),
    )
