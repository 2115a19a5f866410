"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager.

For the operator's tests and for developers (`make cluster-up`). The binaries are v1.20.2,
built from Debian's ``kubernetes`` source package by ``scripts/k8s-build.sh`` and cached
outside the repository (``~/.cache/weft/k8s/v1.20.2/bin``, or ``$WEFT_K8S_BIN``). Everything
listens on 127.0.0.1 only, on free ports, with certificates made for this run (``openssl``),
RBAC on and a static ``system:masters`` token; `kubeconfig` is what clients use. Pods are
stored but never run (no kubelet or scheduler here: the chaos issue brings a whole node).
The controller-manager runs the garbage collector (owner references), the StatefulSet
controller and namespace deletion.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from weft.fabric.errors import ConfigError
from weft.testing.etcd import EtcdServer, free_loopback_ports

K8S_VERSION = "1.20.2"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kubectl")
SERVICE_RANGE = "198.19.0.0/24"  # RFC 2544 benchmarking space, never routed


def cache_dir() -> Path:
    """Where the Kubernetes binaries of `K8S_VERSION` are cached (`$WEFT_CACHE`, else ~/.cache/weft)."""
    return Path(os.environ.get("WEFT_CACHE", Path.home() / ".cache" / "weft")) / "k8s" / f"v{K8S_VERSION}"


def find_binaries() -> Path:
    """The directory holding kube-apiserver, kube-controller-manager and kubectl.

    Raises:
        ConfigError: they are not built (``scripts/k8s-build.sh`` or ``make k8s`` builds them).
    """
    where = Path(os.environ["WEFT_K8S_BIN"]) if os.environ.get("WEFT_K8S_BIN") else cache_dir() / "bin"
    missing = [b for b in BINARIES if not os.access(where / b, os.X_OK)]
    if missing:
        raise ConfigError(
            f"Kubernetes {K8S_VERSION} binaries missing in {where} ({', '.join(missing)}): "
            "run `make k8s` (scripts/k8s-build.sh builds them from Debian's source, ~8 min once)"
        )
    return where


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise ConfigError(
            "openssl is needed to make the control plane's certificates (apt-get install openssl)"
        )
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager) for one test session or by hand.

    Args:
        run_dir: where certificates, logs, etcd's data and the kubeconfig go (default: a
            temporary directory, removed by `close`).
        controller_manager: start kube-controller-manager too (garbage collection,
            StatefulSets, namespaces).
        node_ip: serve on this address instead of 127.0.0.1, for a cluster whose pods reach
            the API (the e2e `local` driver): the ``kubernetes`` Service gets its endpoints,
            service accounts get tokens, and kubelets are reached by their InternalIP.
    """

    def __init__(
        self, run_dir: Path | None = None, *, controller_manager: bool = True, node_ip: str | None = None
    ) -> None:
        self.bin = find_binaries()
        self._temp = run_dir is None
        self.run_dir = Path(tempfile.mkdtemp(prefix="weft-k8s-")) if run_dir is None else Path(run_dir)
        self.controller_manager = controller_manager
        self.token = secrets.token_hex(16)
        self.etcd: EtcdServer | None = None
        self.node_ip = node_ip
        self.port = 0
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def kubeconfig(self) -> Path:
        return self.run_dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://{self.node_ip or '127.0.0.1'}:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.run_dir / "pki" / "ca.crt"

    def kubectl(self, *args: str, timeout: float = 60.0, check: bool = True, input: str | None = None) -> str:
        """Run the cached kubectl against this control plane; its stdout (stderr on failure)."""
        done = subprocess.run(
            [str(self.bin / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)
        return done.stdout if done.returncode == 0 else done.stderr

    # -- start and stop ------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        pki = self.run_dir / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        self._certs(pki)
        self.etcd = EtcdServer(self.run_dir / "etcd", name="k8s-etcd", log_file=self.run_dir / "etcd.log")
        self.etcd.start()
        self.port, kcm_port = free_loopback_ports(2)
        (pki / "tokens.csv").write_text(f'{self.token},admin,uid-admin,"system:masters"\n')
        cluster = f"{{server: '{self.server}', certificate-authority: '{self.ca_file}'}}"
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: weft, cluster: {cluster}}}]\n"
            f"users: [{{name: admin, user: {{token: '{self.token}'}}}}]\n"
            "contexts: [{name: weft, context: {cluster: weft, user: admin, namespace: default}}]\n"
            "current-context: weft\n"
        )
        if self.node_ip is None:  # no pods run: no Service endpoints, no service-account tokens
            where = ["--endpoint-reconciler-type=none", "--disable-admission-plugins=ServiceAccount"]
        else:
            where = ["--kubelet-preferred-address-types=InternalIP", "--allow-privileged=true"]
        address = self.node_ip or "127.0.0.1"
        self.spawn(
            "kube-apiserver",
            f"--etcd-servers={self.etcd.endpoint}",
            f"--bind-address={address}",
            f"--advertise-address={address}",
            f"--secure-port={self.port}",
            "--insecure-port=0",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={self.ca_file}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            f"--authorization-mode={'RBAC' if self.node_ip is None else 'Node,RBAC'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_RANGE}",
            f"--cert-dir={self.run_dir / 'apiserver-certs'}",
            *where,
        )
        self._wait_ready(deadline)
        if self.controller_manager:
            self.spawn(
                "kube-controller-manager",
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={kcm_port}",
                "--port=0",
                "--leader-elect=false",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={self.ca_file}",
                f"--cert-dir={self.run_dir / 'kcm-certs'}",
            )

    def _certs(self, pki: Path) -> None:
        if (pki / "apiserver.crt").exists():
            return
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
                 "-days", "3650", "-subj", "/CN=weft-test-ca", cwd=pki)  # fmt: skip
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key", "-out", "apiserver.csr",
                 "-subj", "/CN=kube-apiserver", cwd=pki)  # fmt: skip
        names = "IP:127.0.0.1,DNS:localhost"
        if self.node_ip is not None:  # pods dial the `kubernetes` Service: its IP and names
            service_ip = SERVICE_RANGE.rsplit(".", 1)[0] + ".1"
            names += f",IP:{self.node_ip},IP:{service_ip}," + ",".join(
                f"DNS:kubernetes{s}" for s in ("", ".default", ".default.svc", ".default.svc.cluster.local")
            )
        (pki / "ext.cnf").write_text(f"subjectAltName={names}\nextendedKeyUsage=serverAuth\n")
        _openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", "apiserver.crt", "-days", "3650", "-extfile", "ext.cnf",
                 cwd=pki)  # fmt: skip
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start the cached binary `name` with its output in ``name.log``; `stop` kills it
        with the rest (the e2e `local` driver adds the node's processes this way)."""
        with (self.run_dir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [str(self.bin / name), *args], stdout=log, stderr=log, stdin=subprocess.DEVNULL
            )
        self._procs[name] = proc
        return proc

    def _wait_ready(self, deadline: float) -> None:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        request = urllib.request.Request(
            f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.token}"}
        )
        while True:
            proc = self._procs["kube-apiserver"]
            if proc.poll() is not None:
                raise ConfigError(
                    f"kube-apiserver exited with {proc.returncode}:\n{self.log_tail('kube-apiserver')}"
                )
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(request, timeout=2, context=context) as answer,
            ):
                if answer.status == 200:
                    return
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"kube-apiserver not ready at {self.server}:\n{self.log_tail('kube-apiserver')}"
                )
            time.sleep(0.2)

    def pids(self) -> list[int]:
        """Every process this control plane started (etcd included)."""
        etcd = [self.etcd.pid] if self.etcd is not None and self.etcd.pid is not None else []
        return etcd + [p.pid for p in self._procs.values()]

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.run_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        # SIGKILL: kube-apiserver can take ~30 s over SIGTERM, and this state is throwaway
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self._procs.values():
            proc.wait(10)
        self._procs.clear()
        if self.etcd is not None:
            self.etcd.close()
            self.etcd = None

    def close(self) -> None:
        self.stop()
        if self._temp:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# -- by hand: `make cluster-up` / `make cluster-down` --------------------------------------------
def _pids_file(run_dir: Path) -> Path:
    return run_dir / "pids"


def up(run_dir: Path) -> ControlPlane:
    """Start a control plane that outlives this process; `down(run_dir)` stops it."""
    if _pids_file(run_dir).exists():
        raise ConfigError(f"a control plane already runs from {run_dir} (make cluster-down first)")
    run_dir.mkdir(parents=True, exist_ok=True)
    plane = ControlPlane(run_dir)
    plane.start()
    assert plane.etcd is not None and plane.etcd.pid is not None
    pids = plane.pids()
    _pids_file(run_dir).write_text("\n".join(str(p) for p in pids) + "\n")
    return plane


def down(run_dir: Path) -> int:
    """Stop what `up` started from `run_dir`; returns how many processes were running."""
    path = _pids_file(run_dir)
    if not path.exists():
        return 0
    stopped = 0
    for line in path.read_text().split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(line), signal.SIGKILL)
            stopped += 1
    shutil.rmtree(run_dir, ignore_errors=True)
    return stopped


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(
        prog="python -m weft.testing.controlplane", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("action", choices=["up", "down"])
    ap.add_argument("--dir", type=Path, default=cache_dir().parent / "cluster", help="run directory")
    args = ap.parse_args(argv)
    if args.action == "down":
        print(f"stopped {down(args.dir)} processes; removed {args.dir}")
        return 0
    try:
        plane = up(args.dir)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    etcd = plane.etcd.endpoint if plane.etcd else "?"
    print(f"kube-apiserver {K8S_VERSION} at {plane.server}, etcd at {etcd}")
    print(f"export KUBECONFIG={plane.kubeconfig}")
    print(f"kubectl: {plane.bin / 'kubectl'}    logs: {plane.run_dir}/*.log")
    sys.stdout.flush()
    os._exit(0)  # leave the processes running: no clean-up on the way out


if __name__ == "__main__":
    raise SystemExit(main())
