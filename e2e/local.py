"""The `local` driver: a real single-node Kubernetes 1.20 on this machine, built from Debian's
packages, with weft installed by its Helm chart.

What runs (all from Debian's packages or built from Debian's ``kubernetes`` source package by
``scripts/k8s-build.sh --node``, cached in ``~/.cache/weft/k8s``):

- etcd + kube-apiserver + kube-controller-manager (`weft.testing.controlplane.ControlPlane`,
  serving on the node address), kube-scheduler, kubelet 1.20 with dockershim, kube-proxy in
  iptables mode;
- dockerd from ``docker.io`` with its own socket and data root, started by hand;
- CNI from ``containernetworking-plugins``: bridge + host-local + firewall + portmap;
- images: a static ``pause`` built from Kubernetes' pause.c, and the agent and operator
  images built from agent/Dockerfile and operator/Dockerfile on a Debian root filesystem
  (debootstrap, `docker import`), pods use ``imagePullPolicy: Never``.

Three things this kind of machine needs (found by ../shared/reference/k8s-from-debian):
1. no CAP_SYS_RESOURCE: a negative oom_score_adj (the kubelet gives pause -998) makes runc
   fail, so dockerd's default runtime is a runc wrapper that clamps it to 0 (`RUNC_NOOOM`);
2. the kubelet refuses a loopback node IP and the kernel has no dummy links: the node IP
   lives on an empty bridge (``weftnode0``), and the apiserver reaches kubelets by InternalIP;
3. Docker sets FORWARD to DROP: the CNI chain has the ``firewall`` plugin.

Addresses come only from 198.18.0.0/15 (RFC 2544, never routed), on bridges this driver
creates and removes: node 198.18.0.1/24, pods 198.18.1.0/24, docker's bridge 198.18.2.1/24,
services 198.19.0.0/24. iptables is saved before `up` and restored by `down`. There is no
cluster DNS (Debian has no CoreDNS): the chart and the agents do without it.

    python -m e2e.local up|down      # by hand: prints KUBECONFIG
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal as _signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from e2e import chart, images
from e2e.driver import ETCD_CLIENT_SECRET, RELEASE, TOKEN_SECRET, KubeDriver, Pod
from e2e.shell import CommandError, isolate_argv, run, succeeds
from weft.testing.controlplane import ControlPlane, cache_dir
from weft.testing.etcd import free_loopback_ports

ROOT = Path(__file__).resolve().parent.parent
NODE_IP, NODE_BRIDGE = "198.18.0.1", "weftnode0"
POD_RANGE, POD_BRIDGE = "198.18.1.0/24", "weftcni0"
DOCKER_BIP, DOCKER_BRIDGE = "198.18.2.1/24", "weftdocker0"
NODE_NAME = "weft-node"
ETCD_IP = "198.19.0.250"  # etcd's Service: a fixed cluster IP, named in its certificate (no cluster DNS)
CNI_CONF = Path("/etc/cni/net.d/10-weft-e2e.conflist")
PAUSE_IMAGE = "k8s.gcr.io/pause:3.2"
DEBIAN_PACKAGES = {
    "dockerd": "docker.io",
    "runc": "runc",
    "containerd": "containerd",
    "conntrack": "conntrack",
    "iptables": "iptables",
    "socat": "socat",
    "nsenter": "util-linux",
    "debootstrap": "debootstrap",
}
RUNC_NOOOM = """#!/bin/sh
# runc wrapper: no CAP_SYS_RESOURCE here, so a negative process.oomScoreAdj (the kubelet gives
# -998 to pause, -997 to Guaranteed pods) makes runc init fail: clamp it to 0 on create/run.
b=""; prev=""; create=0
for a in "$@"; do
  case "$prev" in --bundle|-b) b="$a";; esac
  case "$a" in --bundle=*) b="${a#--bundle=}";; create|run) create=1;; esac
  prev="$a"
done
if [ "$create" = 1 ] && [ -n "$b" ] && [ -f "$b/config.json" ]; then
  python3 - "$b/config.json" <<'PY'
import json, sys
p = sys.argv[1]; c = json.load(open(p)); pr = c.get("process", {})
if pr.get("oomScoreAdj", 0) < 0:
    pr["oomScoreAdj"] = 0; json.dump(c, open(p, "w"))
PY
fi
exec /usr/sbin/runc "$@"
"""


class ClusterError(Exception):
    """The local cluster could not be brought up; the message says which part and why."""


def _wait(what: str, probe: Any, timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            got = probe()
            if got:
                return got
        if time.monotonic() > deadline:
            raise ClusterError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def ensure_host() -> Path:
    """Root, Debian's packages, the node binaries (built once); returns the binaries' folder."""
    if os.geteuid() != 0:
        raise ClusterError("the local cluster needs root (bridges, iptables, dockerd, kubelet)")
    missing = sorted({pkg for cmd, pkg in DEBIAN_PACKAGES.items() if shutil.which(cmd) is None})
    if not Path("/usr/lib/cni/bridge").exists():
        missing.append("containernetworking-plugins")
    if missing:
        run(["apt-get", "update", "-qq"], 600)
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        try:
            run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], 900, env=env)
        except CommandError as exc:
            raise ClusterError(f"apt-get install {' '.join(missing)} failed:\n{exc.stderr[-2000:]}") from None
    built = run([str(ROOT / "scripts" / "k8s-build.sh"), "--node"], 1800)
    return Path(built.strip().splitlines()[-1])


class LocalCluster:
    """The cluster itself: `start` / `stop`, plus what the driver needs of it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir.resolve()  # dockerd and the kubelet need absolute paths
        self.plane: ControlPlane | None = None
        self.docker_sock = run_dir / "docker.sock"
        self.docker = ["/usr/bin/docker", "-H", f"unix://{self.docker_sock}"]
        self._dockerd: subprocess.Popen[bytes] | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}  # the node's, beside the plane's

    @property
    def kubeconfig(self) -> Path:
        return self.run_dir / "kubeconfig"

    def start(self, timeout: float = 180.0) -> None:
        bin_dir = ensure_host()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "iptables.before").write_text(run(["iptables-save"]))
        _bridge(NODE_BRIDGE, f"{NODE_IP}/24")
        self._start_dockerd()
        self._pause_image(bin_dir)
        plane = self.plane = ControlPlane(self.run_dir / "plane", node_ip=NODE_IP)
        plane.start()
        shutil.copy(plane.kubeconfig, self.kubeconfig)
        k = str(plane.kubeconfig)
        procs = self._procs
        procs["kube-scheduler"] = plane.spawn("kube-scheduler", f"--kubeconfig={k}",
                    f"--authentication-kubeconfig={k}", f"--authorization-kubeconfig={k}",
                    "--bind-address=127.0.0.1", "--secure-port=0", "--port=0",
                    "--leader-elect=false")  # fmt: skip
        self._cni()
        root = self.run_dir / "kubelet"
        (root / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
        (root / "config.yaml").write_text(_KUBELET_CONFIG.format(node_ip=NODE_IP))
        procs["kubelet"] = plane.spawn("kubelet", f"--config={root / 'config.yaml'}", f"--kubeconfig={k}",
                    "--container-runtime=docker", f"--docker-endpoint=unix://{self.docker_sock}",
                    f"--pod-infra-container-image={PAUSE_IMAGE}", "--network-plugin=cni",
                    "--cni-bin-dir=/usr/lib/cni", f"--cni-conf-dir={CNI_CONF.parent}",
                    f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}", "--register-node=true",
                    f"--root-dir={root / 'root'}", f"--cert-dir={root / 'pki'}")  # fmt: skip
        healthz, metrics = free_loopback_ports(2)
        procs["kube-proxy"] = plane.spawn("kube-proxy", f"--kubeconfig={k}",
                    f"--hostname-override={NODE_NAME}", "--proxy-mode=iptables",
                    f"--cluster-cidr={POD_RANGE}", f"--bind-address={NODE_IP}",
                    f"--healthz-bind-address=127.0.0.1:{healthz}",
                    f"--metrics-bind-address=127.0.0.1:{metrics}",
                    "--conntrack-max-per-core=0")  # fmt: skip
        _wait("node Ready", lambda: " Ready" in self.kubectl("get", "node", NODE_NAME), timeout)
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise ClusterError(f"{name} exited:\n{plane.log_tail(name)}")
        _wait("default service account", lambda: self.kubectl("get", "sa", "default"), 60)

    def _start_dockerd(self) -> None:
        data = cache_dir().parent / "docker"  # images survive runs (tags are content hashes)
        runc = self.run_dir / "runc-nooom"
        runc.write_text(RUNC_NOOOM)
        runc.chmod(0o755)
        _bridge(DOCKER_BRIDGE, DOCKER_BIP)  # dockerd uses it as it is (--bridge)
        log = (self.run_dir / "dockerd.log").open("ab")
        self._dockerd = subprocess.Popen(
            ["dockerd", "-H", f"unix://{self.docker_sock}", f"--data-root={data}",
             f"--exec-root={self.run_dir / 'dx'}", f"--pidfile={self.run_dir / 'dockerd.pid'}",
             "--exec-opt", "native.cgroupdriver=cgroupfs", f"--bridge={DOCKER_BRIDGE}",
             f"--add-runtime=nooom={runc}", "--default-runtime=nooom"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        _wait("dockerd", lambda: succeeds([*self.docker, "info"], 10), 60)

    def _pause_image(self, bin_dir: Path) -> None:
        if succeeds([*self.docker, "image", "inspect", PAUSE_IMAGE], 30):
            return
        with tempfile.TemporaryDirectory() as tmp:
            tar = Path(tmp) / "pause.tar"
            with tarfile.open(tar, "w") as t:
                t.add(bin_dir / "pause", arcname="pause")
            run([*self.docker, "import", "--change", 'ENTRYPOINT ["/pause"]', str(tar), PAUSE_IMAGE], 120)

    def _cni(self) -> None:
        CNI_CONF.parent.mkdir(parents=True, exist_ok=True)
        conf = {
            "cniVersion": "0.4.0",
            "name": "weft-e2e",
            "plugins": [
                {"type": "bridge", "bridge": POD_BRIDGE, "isGateway": True, "ipMasq": False,
                 "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_RANGE}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.run_dir / "cni-ipam")}},
                {"type": "firewall", "backend": "iptables"},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }  # fmt: skip
        CNI_CONF.write_text(json.dumps(conf, indent=1))

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> str:
        assert self.plane is not None
        argv = [str(self.plane.bin / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args]
        return run(argv, timeout, input=input, check=check)

    def container_pid(self, container: str) -> int:
        """The host pid of the container's main process.

        Raises:
            ClusterError: the container is not running (docker reports pid 0, and a signal to
                pid 0 would go to this process's own group).
        """
        pid = int(run([*self.docker, "inspect", "-f", "{{.State.Pid}}", container], 30).strip())
        if pid <= 0:
            raise ClusterError(f"container {container} is not running (pid {pid})")
        return pid

    def stop(self) -> None:
        """Containers first (the kubelet would restart them), then the processes, then the
        host: bridges, CNI config, iptables as they were before `start`."""
        kubelet = self._procs.get("kubelet")
        if kubelet is not None and kubelet.poll() is None:
            kubelet.kill()
        if self.docker_sock.exists():
            ids = run([*self.docker, "ps", "-aq"], 30, check=False).split()
            if ids:
                run([*self.docker, "rm", "-f", *ids], 120, check=False)
        pidfile = self.run_dir / "dockerd.pid"
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError, ClusterError):
                pid = int(pidfile.read_text().strip())
                os.kill(pid, _signal.SIGTERM)
                _wait("dockerd to exit", lambda: not Path(f"/proc/{pid}").exists(), 30)
        if self._dockerd is not None:
            self._dockerd.wait(10)
        if self.plane is not None:
            self.plane.stop()
        # the kubelet's tmpfs volumes (secrets, tokens) outlive it
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(f"{self.run_dir}/")), reverse=True):
            run(["umount", "-l", mount], 30, check=False)
        CNI_CONF.unlink(missing_ok=True)
        for bridge in (POD_BRIDGE, DOCKER_BRIDGE, NODE_BRIDGE):
            run(["ip", "link", "del", bridge], 30, check=False)
        before = self.run_dir / "iptables.before"
        if before.exists():
            run(["iptables-restore"], 60, check=False, input=_full_restore(before.read_text()))


_BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}


def _full_restore(saved: str) -> str:
    """`saved` (iptables-save) with an empty, all-ACCEPT section for every table it lacks:
    iptables-restore flushes only the tables it is given, and the rules of kube-proxy, the
    CNI firewall plugin and dockerd went into tables that were empty before."""
    out = saved
    for table, chains in _BUILTIN_CHAINS.items():
        if f"*{table}\n" not in saved:
            out += f"*{table}\n" + "".join(f":{c} ACCEPT [0:0]\n" for c in chains) + "COMMIT\n"
    return out


def _bridge(name: str, address: str) -> None:
    if not succeeds(["ip", "link", "show", name], 10):
        run(["ip", "link", "add", name, "type", "bridge"])
    have = run(["ip", "-4", "addr", "show", "dev", name])
    if address.split("/", maxsplit=1)[0] not in have:
        run(["ip", "addr", "add", address, "dev", name])
    run(["ip", "link", "set", name, "up"])


_KUBELET_CONFIG = """apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {node_ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 0
cgroupDriver: cgroupfs
failSwapOn: false
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization:
  mode: AlwaysAllow
clusterDomain: cluster.local
clusterDNS: []
resolvConf: /etc/resolv.conf
evictionHard: {{"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
"""


class LocalDriver(KubeDriver):
    """The `Driver` on `LocalCluster`: the chart installed with Helm's SDK, one TransferGroup
    of `replicas` agents; faults go straight to the containers' processes (they are this
    host's processes)."""

    name = "local"

    def __init__(
        self, run_dir: Path, *, namespace: str = "weft-system", group: str = "chaos", replicas: int = 4
    ) -> None:
        self.cluster = LocalCluster(run_dir)
        self.namespace, self.group, self.replicas = namespace, group, replicas
        self.built: images.Images | None = None

    def up(self) -> None:
        from e2e import scenarios

        self.cluster.start()
        built = self.built = images.build_images(self.cluster.docker, "debian-rootfs")
        assert built.base is not None
        operator_repo, operator_tag = built.operator.split(":")
        base_repo, base_tag = built.base.split(":")
        chart.install(
            self.cluster.kubeconfig,
            {
                "image": {"repository": operator_repo, "tag": operator_tag, "pullPolicy": "Never"},
                "etcd": {
                    "image": {"repository": base_repo, "tag": base_tag, "pullPolicy": "Never"},
                    "clusterIP": ETCD_IP,
                },
            },
            release=RELEASE, namespace=self.namespace, timeout=180,
        )  # fmt: skip
        manifest = scenarios.group_manifest(
            namespace=self.namespace, name=self.group, replicas=self.replicas, image=built.agent,
            endpoints=[self.etcd_endpoint()], token_secret=TOKEN_SECRET,
            tls_secret=ETCD_CLIENT_SECRET, pull_policy="Never",
        )  # fmt: skip
        self.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        self.wait_agents_ready(timeout=180.0)

    def down(self) -> None:
        self.cluster.stop()

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60.0) -> str:
        return self.cluster.kubectl(*args, input=input, check=check, timeout=timeout)

    def kubectl_argv(self) -> list[str]:
        assert self.cluster.plane is not None
        return [str(self.cluster.plane.bin / "kubectl"), f"--kubeconfig={self.cluster.kubeconfig}"]

    def etcd_endpoint(self) -> str:
        """etcd's Service at its fixed cluster IP (kube-proxy routes it on this host too)."""
        return f"https://{ETCD_IP}:2379"

    def signal(self, pod: Pod, sig: _signal.Signals) -> None:
        os.kill(self.cluster.container_pid(pod.container), sig)

    def partition(self, pod: Pod, on: bool) -> None:
        pid = str(self.cluster.container_pid(pod.container))
        for argv in isolate_argv(pid, on):
            run(argv, 30, check=on)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m e2e.local", description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["up", "down"])
    ap.add_argument("--dir", type=Path, default=cache_dir().parent / "e2e-cluster", help="run directory")
    args = ap.parse_args(argv)
    driver = LocalDriver(args.dir)
    if args.action == "down":
        pids = args.dir / "pids"
        for line in pids.read_text().split() if pids.exists() else []:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line), _signal.SIGKILL)
        driver.cluster.stop()
        return 0
    try:
        driver.up()
    except BaseException:
        driver.down()
        raise
    procs = driver.cluster.plane.pids() if driver.cluster.plane is not None else []
    (args.dir / "pids").write_text("\n".join(map(str, procs)) + "\n")
    print(f"export KUBECONFIG={driver.cluster.kubeconfig}")
    sys.stdout.flush()
    os._exit(0)  # leave it running


if __name__ == "__main__":
    sys.exit(main())
