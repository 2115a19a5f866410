"""The `kind` driver: the chaos scenarios against a kind cluster (Kubernetes in Docker), for
hosts with Docker and Docker Hub access (kind pulls its node image from there).

Pods run inside the kind node's container, so faults are made there: `docker exec` into the
node, find the container's PID with ``crictl``, then ``kill`` it or ``nsenter`` its network
namespace to add iptables rules. The pod network is not reachable from the host on every
platform (Docker Desktop), so etcd is reached through ``kubectl port-forward``; the traffic
generator dials agents at their pod IPs, so on Linux `up` routes the node's pod range through
the node container (root), and `down` removes the route.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import IO

from e2e.driver import ETCD_CLIENT_SECRET, ETCD_SERVICE, RELEASE, TOKEN_SECRET, KubeDriver, Pod
from e2e.shell import isolate_argv, run

log = logging.getLogger(__name__)

PID_TEMPLATE = ("--output", "go-template", "--template", "{{.info.pid}}")  # crictl inspect
FORWARDING = re.compile(r"Forwarding from 127\.0\.0\.1:(\d+)")


def _split_ref(ref: str) -> tuple[str, str]:
    """``repo:tag`` into repository and tag (a registry's ``host:port/`` is not a tag)."""
    repo, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, "latest"
    return repo, tag


class KindDriver(KubeDriver):
    """A kind cluster with the chart installed and one TransferGroup of `replicas` agents."""

    name = "kind"

    def __init__(
        self,
        *,
        cluster: str = "weft-e2e",
        namespace: str = "weft-system",
        group: str = "chaos",
        replicas: int = 4,
        workdir: Path,
    ) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.group = group
        self.replicas = replicas
        self.workdir = workdir
        self.kubeconfig = workdir / "kubeconfig"
        self._forward: subprocess.Popen[bytes] | None = None
        self._forward_log: IO[bytes] | None = None
        self._forward_url = ""
        self._routed = ""  # the pod range routed to the node by `up`

    # -- lifecycle -----------------------------------------------------------------------
    def up(self) -> None:
        from e2e import chart, images, scenarios

        self.workdir.mkdir(parents=True, exist_ok=True)
        kubeconfig = ("--kubeconfig", str(self.kubeconfig))
        if self.cluster in run(["kind", "get", "clusters"], 60).split():
            log.info("kind cluster %s exists; reusing it", self.cluster)
            self._kind("export", "kubeconfig", *kubeconfig, timeout=60)
        else:
            log.info("creating kind cluster %s", self.cluster)
            self._kind("create", "cluster", *kubeconfig, "--wait", "120s", timeout=300)
        built = images.build_images(docker=["docker"], base=None)
        for ref in (built.agent, built.operator):
            log.info("loading %s into %s", ref, self.cluster)
            self._kind("load", "docker-image", ref, timeout=600)
        repo, tag = _split_ref(built.operator)
        chart.install(  # creates the namespace and CRD, and waits for the release to be ready
            self.kubeconfig,
            {"image": {"repository": repo, "tag": tag, "pullPolicy": "IfNotPresent"}},
            release=RELEASE,
            namespace=self.namespace,
        )
        manifest = scenarios.group_manifest(
            namespace=self.namespace,
            name=self.group,
            replicas=self.replicas,
            image=built.agent,
            endpoints=[f"https://{ETCD_SERVICE}.{self.namespace}.svc:2379"],
            token_secret=TOKEN_SECRET,
            tls_secret=ETCD_CLIENT_SECRET,
        )
        self.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        self.wait_agents_ready(timeout=180.0)
        self._route_pods()

    def _route_pods(self) -> None:
        """The traffic generator runs on this host and dials the agents at their pod IPs:
        route the node's pod range through the node container (Linux, root)."""
        node = f"{self.cluster}-control-plane"
        ip = run(
            ["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", node], 30
        )
        cidr = self.kubectl("get", "node", node, "-o", "jsonpath={.spec.podCIDR}").strip()
        run(["ip", "route", "replace", cidr, "via", ip.strip()], 30)
        self._routed = cidr

    def _kind(self, *args: str, timeout: float) -> str:
        return run(["kind", *args, "--name", self.cluster], timeout)

    def down(self) -> None:
        self._stop_forward()
        if self._routed:
            run(["ip", "route", "del", self._routed], 30, check=False)
        self._kind("delete", "cluster", timeout=180)

    # -- the API -------------------------------------------------------------------------
    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60.0) -> str:
        return run([*self.kubectl_argv(), *args], timeout, input=input, check=check)

    def kubectl_argv(self) -> list[str]:
        return ["kubectl", "--kubeconfig", str(self.kubeconfig)]

    def etcd_endpoint(self) -> str:
        """A port-forward to the etcd Service, started once and again if it ended (it ends
        when the etcd pod it picked goes away)."""
        if self._forward is not None and self._forward.poll() is None:
            return self._forward_url
        self._stop_forward()
        log_path = self.workdir / "port-forward.log"
        # a file, not a pipe: kubectl logs every connection, and a pipe nobody reads fills up
        self._forward_log = log_path.open("wb")
        forward = (
            "port-forward",
            "-n",
            self.namespace,
            "--address",
            "127.0.0.1",
            f"svc/{ETCD_SERVICE}",
            "0:2379",
        )
        self._forward = subprocess.Popen(
            [*self.kubectl_argv(), *forward],
            stdout=self._forward_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            found = FORWARDING.search(log_path.read_text(errors="replace"))
            if found:
                self._forward_url = f"https://127.0.0.1:{found.group(1)}"  # the certificate names 127.0.0.1
                return self._forward_url
            if self._forward.poll() is not None:
                break
            time.sleep(0.2)
        output = log_path.read_text(errors="replace")
        self._stop_forward()
        raise RuntimeError(f"kubectl port-forward to {ETCD_SERVICE} did not start:\n{output}")

    def _stop_forward(self) -> None:
        if self._forward is not None:
            self._forward.terminate()
            try:
                self._forward.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._forward.kill()
                self._forward.wait(timeout=10)
            self._forward = None
        if self._forward_log is not None:
            self._forward_log.close()
            self._forward_log = None

    # -- faults, inside the kind node ----------------------------------------------------
    def _node_and_pid(self, pod: Pod) -> tuple[str, str]:
        """The kind node container the pod runs on (kind names them after the nodes), and
        its main process's PID there."""
        node = self.kubectl(
            "get", "pod", pod.name, "-n", self.namespace, "-o", "jsonpath={.spec.nodeName}"
        ).strip()
        node = node or f"{self.cluster}-control-plane"
        pid = run(["docker", "exec", node, "crictl", "inspect", *PID_TEMPLATE, pod.container], 30).strip()
        if not pid.isdigit():
            raise RuntimeError(f"no PID for {pod.name} ({pod.container}) on {node}: {pid!r}")
        return node, pid

    def signal(self, pod: Pod, sig: signal.Signals) -> None:
        node, pid = self._node_and_pid(pod)
        # the shell's builtin kill: the node image (debian-slim) may have no /bin/kill
        run(["docker", "exec", node, "sh", "-c", f"kill -{sig.name.removeprefix('SIG')} {pid}"], 30)

    def partition(self, pod: Pod, on: bool) -> None:
        """Drop everything but loopback in the pod's network namespace (`on`), or delete those
        rules; healing a pod that has no such rules is not an error."""
        node, pid = self._node_and_pid(pod)
        for argv in isolate_argv(pid, on):
            try:
                run(["docker", "exec", node, *argv], 30)
            except subprocess.CalledProcessError as exc:
                if on:
                    raise
                log.info("heal %s %s: %s", pod.name, argv[6], exc.stderr.strip())
