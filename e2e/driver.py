"""What a scenario needs from a cluster: the `Driver` protocol, implemented by the `local`
driver (`e2e.local`: a real single-node cluster built from Debian's packages) and the `kind`
driver (`e2e.kind`). Scenarios (`e2e.scenarios`) only talk to this."""

from __future__ import annotations

import base64
import datetime
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from weft.operator import children

RELEASE = "weft"  # the chart's release: names the etcd Service and the join-token Secret
ETCD_SERVICE = f"{RELEASE}-etcd"
TOKEN_SECRET = f"{RELEASE}-join-token"
ETCD_CLIENT_SECRET = f"{RELEASE}-etcd-client"  # the chart's etcd client certificate (TLS on)
TLS_FILES = (("ca.crt", "ca_file"), ("tls.crt", "cert_file"), ("tls.key", "key_file"))


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

    def etcd_tls(self, into: Path) -> dict[str, Path]:
        """The chart's etcd client certificate written into `into` (0600 files), as
        `EtcdSettings` fields (ca_file, cert_file, key_file); empty when etcd runs without TLS."""

    def active_operator(self) -> str | None:
        """The name of the operator pod that works now (the live peer of highest priority)."""

    def pods(self, component: str) -> list[Pod]:
        """``agent``, ``operator`` or ``etcd`` pods, by name."""

    def signal(self, pod: Pod, sig: signal.Signals) -> None:
        """Send `sig` to the pod's main process (SIGKILL, SIGSTOP, SIGCONT)."""

    def partition(self, pod: Pod, on: bool) -> None:
        """Cut the pod off the network (everything but loopback), or heal it."""

    def group_status(self) -> dict[str, Any]:
        """The TransferGroup's status, as the API has it."""

    def group_generation(self) -> int:
        """The TransferGroup's metadata.generation (one more per spec change)."""

    def watch_group(self, jsonpath: str) -> FieldWatch:
        """A field of the TransferGroup (a kubectl jsonpath), each value it takes with the
        moment this host saw it."""

    def scale(self, replicas: int) -> None: ...


class FieldWatch:
    """`kubectl get --watch` of one field: the values it printed, each with the
    `time.monotonic()` it arrived at, so a change is timed to the millisecond instead of to
    the next poll (a kubectl process per poll takes a good part of a second on a busy host)."""

    def __init__(self, argv: list[str]) -> None:
        self.seen: list[tuple[float, str]] = []
        self._proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True
        )
        self._reader = threading.Thread(target=self._read, name="field-watch", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.seen.append((time.monotonic(), line.strip()))

    def first(self, pred: Callable[[str], bool]) -> float | None:
        """When a value that satisfies `pred` first arrived, or None."""
        return next((at for at, value in list(self.seen) if pred(value)), None)

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait(10)
        self._reader.join(5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()


class KubeDriver:
    """What both drivers do the same way, through kubectl."""

    namespace: str
    group: str
    replicas: int

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60.0) -> str:
        raise NotImplementedError

    def kubectl_argv(self) -> list[str]:
        """kubectl and its flags for this cluster (for a process that outlives a call)."""
        raise NotImplementedError

    def watch_group(self, jsonpath: str) -> FieldWatch:
        where = ("get", "transfergroup", self.group, "-n", self.namespace, "--watch")
        return FieldWatch([*self.kubectl_argv(), *where, "-o", f'jsonpath={jsonpath}{{"\\n"}}'])

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

    def etcd_tls(self, into: Path) -> dict[str, Path]:
        found = self.kubectl(
            "get", "secret", ETCD_CLIENT_SECRET, "-n", self.namespace, "-o", "json", check=False
        )
        if not found.strip():
            return {}
        data = json.loads(found).get("data") or {}
        into.mkdir(parents=True, exist_ok=True, mode=0o700)
        files: dict[str, Path] = {}
        for key, setting in TLS_FILES:
            path = into / key
            path.touch(mode=0o600)
            path.write_bytes(base64.b64decode(data[key]))
            files[setting] = path
        return files

    def active_operator(self) -> str | None:
        found = self.kubectl("get", "clusterkopfpeering", RELEASE, "-o", "json", check=False, timeout=10)
        if not found.strip():
            return None
        peers = json.loads(found).get("status") or {}
        now = time.time()
        live = [
            (int(p.get("priority") or 0), name)
            for name, p in peers.items()
            if isinstance(p, dict) and _seen_within(p, now)
        ]
        return max(live)[1] if live else None

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

    def group_generation(self) -> int:
        found = self.kubectl(
            "get", "transfergroup", self.group, "-n", self.namespace, "-o", "jsonpath={.metadata.generation}"
        )
        return int(found.strip())

    def scale(self, replicas: int) -> None:
        self.kubectl("scale", f"transfergroup/{self.group}", "-n", self.namespace, f"--replicas={replicas}")


def _seen_within(peer: dict[str, Any], now: float) -> bool:
    """A kopf peering record still within its lifetime."""
    try:
        seen = datetime.datetime.fromisoformat(str(peer["lastseen"])).timestamp()
    except (KeyError, ValueError):
        return False
    return seen + float(peer.get("lifetime") or 0) > now


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
