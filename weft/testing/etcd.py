"""Start and stop a real, single-member etcd: for the tests and for `weft demo`.

weft's membership talks to etcd and nothing else, so its tests and the demo need a real
server, not a fake: leases, watches, auth and TLS behave in ways a fake would get wrong.
`EtcdServer` runs the `etcd` binary (Debian's `etcd-server`, 3.4) as a child process on free
loopback ports, waits until it answers, and can stop, kill and restart it on the same ports
and data for chaos tests. The child runs in its own session so that a Ctrl-C in the terminal
reaches the parent first, and the parent then stops it.

Only this module and `etcdctl` are involved; nothing here speaks the etcd protocol.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from weft.fabric.errors import ConfigError
from weft.membership import errors

log = logging.getLogger(__name__)

_DEFAULT_BINARY = "/usr/bin/etcd"
_DEFAULT_ETCDCTL = "/usr/bin/etcdctl"
_INSTALL_HINT = "install it with `make setup` or `apt-get install etcd-server etcd-client`"
_LOOPBACK = "127.0.0.1"
_QUOTA_BACKEND_BYTES = 256 << 20
_LOG_TAIL_BYTES = 4096
_POLL_INTERVAL = 0.05
_PROBE_TIMEOUT = 1.0
_KILL_WAIT = 10.0
_ETCDCTL_TIMEOUT = 10.0


class EtcdStartError(errors.EtcdUnavailableError):
    """The etcd child exited, or did not answer its health check, before the deadline.

    Attributes:
        log_tail: the end of what etcd logged during this start (empty when nothing was).
    """

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(f"{message}\n--- etcd log (tail) ---\n{log_tail}" if log_tail else message)
        self.log_tail = log_tail


class EtcdctlError(errors.EtcdError):
    """An `etcdctl` command run by `EtcdServer` failed or timed out."""


@dataclasses.dataclass(frozen=True)
class EtcdTLS:
    """TLS material of the server's client port (the peer port stays plain http on loopback).

    Attributes:
        ca_file: PEM of the CA that signed the server and the client certificates.
        cert_file: the server certificate; its SAN must cover 127.0.0.1 (and localhost).
        key_file: the server certificate's private key.
        client_cert_auth: require a client certificate signed by `ca_file`
            (`--client-cert-auth --trusted-ca-file`).
        client_cert_file: certificate the launcher itself presents (health checks, `etcdctl`)
            when `client_cert_auth` is on. Default: `cert_file`, which then needs the
            clientAuth extended key usage as well (etcd 3.4's own gRPC gateway needs it too).
        client_key_file: key of `client_cert_file` (default: `key_file`).
    """

    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_auth: bool = True
    client_cert_file: Path | None = None
    client_key_file: Path | None = None

    @property
    def own_client_cert(self) -> tuple[Path, Path]:
        """The (certificate, key) the launcher presents as a client."""
        return (self.client_cert_file or self.cert_file, self.client_key_file or self.key_file)


def find_etcd_binary(binary: str | None = None) -> str:
    """Locate the etcd server binary.

    Args:
        binary: an explicit path or command name; otherwise `$WEFT_ETCD_BIN`, then `etcd` on
            the PATH, then /usr/bin/etcd.

    Returns:
        The absolute path of an executable etcd.

    Raises:
        ConfigError: nothing executable was found.
    """
    return _find_tool(binary or os.environ.get("WEFT_ETCD_BIN"), "etcd", _DEFAULT_BINARY, "etcd-server")


def find_etcdctl_binary(etcd_binary: str | None = None) -> str:
    """Locate `etcdctl`: `$WEFT_ETCDCTL_BIN`, then next to `etcd_binary`, then the PATH.

    Raises:
        ConfigError: nothing executable was found.
    """
    explicit = os.environ.get("WEFT_ETCDCTL_BIN")
    if explicit is None and etcd_binary is not None:
        sibling = Path(etcd_binary).with_name("etcdctl")
        if os.access(sibling, os.X_OK):
            return str(sibling)
    return _find_tool(explicit, "etcdctl", _DEFAULT_ETCDCTL, "etcd-client")


def _find_tool(explicit: str | None, name: str, default: str, package: str) -> str:
    candidates = [explicit] if explicit else [shutil.which(name), default]
    for candidate in candidates:
        if candidate is None:
            continue
        found = shutil.which(candidate)
        if found is not None:
            return str(Path(found).resolve())
    where = (
        f"{explicit!r} is not an executable" if explicit else f"{name} is not on the PATH nor at {default}"
    )
    raise ConfigError(f"etcd is needed but {where}; {_INSTALL_HINT} (Debian package {package})")


def free_loopback_ports(count: int) -> list[int]:
    """Ports the kernel just handed out on 127.0.0.1, free now (the race after close is accepted).

    Args:
        count: how many distinct ports to pick.

    Returns:
        `count` port numbers, all bound at once so that none repeats.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((_LOOPBACK, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


class EtcdServer:
    """One etcd member, started as a child process on free loopback ports.

    The first `start()` picks the ports (and a temporary data directory unless one was given);
    every later start reuses both, so a restart keeps the endpoint and the data. Use it as a
    context manager, or call `close()`.

    Args:
        data_dir: etcd's data directory (created by etcd if missing). Default: a temporary
            directory, removed by `close()`.
        tls: serve the client port over TLS with this material; plain http when None.
        binary: the etcd binary (see `find_etcd_binary`).
        name: the member name.
        log_file: where etcd's log goes (appended). Default: `<name>.log` next to the data
            directory.

    Raises:
        ConfigError: no etcd binary was found.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        tls: EtcdTLS | None = None,
        binary: str | None = None,
        name: str = "weft-etcd",
        log_file: Path | None = None,
    ) -> None:
        self._binary = find_etcd_binary(binary)
        self._tls = tls
        self._name = name
        self._given_data_dir = data_dir
        self._given_log_file = log_file
        self._temp_dir: Path | None = None
        self._data_dir: Path | None = None
        self._log_file: Path | None = None
        self._ports: tuple[int, int] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # -- properties ----------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The client URL, "http://127.0.0.1:PORT" or "https://127.0.0.1:PORT"."""
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{_LOOPBACK}:{self.client_port}"

    @property
    def client_port(self) -> int:
        """The client port (fixed by the first `start()`)."""
        return self._require_ports()[0]

    @property
    def peer_port(self) -> int:
        """The peer port (fixed by the first `start()`)."""
        return self._require_ports()[1]

    @property
    def data_dir(self) -> Path:
        """etcd's data directory (fixed by the first `start()` when none was given)."""
        if self._data_dir is None:
            if self._given_data_dir is None:
                raise errors.EtcdError("the data directory is chosen by the first start()")
            return self._given_data_dir
        return self._data_dir

    @property
    def log_file(self) -> Path | None:
        """Where etcd logs (None before the first `start()` unless one was given)."""
        return self._log_file or self._given_log_file

    @property
    def tls(self) -> EtcdTLS | None:
        """The TLS material of the client port, None for plain http."""
        return self._tls

    @property
    def pid(self) -> int | None:
        """The etcd process id while it runs, else None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the etcd child is alive (healthy or not)."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        """Start etcd and wait until it reports healthy.

        Args:
            timeout: seconds to wait for the health check to pass.

        Raises:
            EtcdStartError: etcd exited or did not become healthy in time (etcd is stopped).
        """
        if self.running:
            return
        first = self._ports is None
        self._prepare_dirs()
        deadline = time.monotonic() + timeout
        try:
            self._start_once(deadline)
        except EtcdStartError as exc:
            # Ports are picked by binding port 0 and closing; another process may have taken
            # one since. Retry once with new ports, and only when the ports are not yet fixed.
            if not (first and "address already in use" in exc.log_tail):
                raise
            log.warning("etcd port taken by someone else; retrying with new ports")
            self._ports = None
            self._start_once(deadline)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop etcd: SIGTERM, then SIGKILL if it has not exited after `timeout` seconds.

        Idempotent; the ports and the data stay for a later `start()`.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            log.info("stopping etcd pid %d", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("etcd pid %d ignored SIGTERM for %.1f s; killing it", proc.pid, timeout)
                self._kill_and_wait(proc)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL etcd now (a crash, for chaos tests) and wait until it has exited."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            log.info("killing etcd pid %d", proc.pid)
            self._kill_and_wait(proc)
        self._proc = None

    def restart(self, timeout: float = 20.0) -> None:
        """Stop, then start again on the same ports and data.

        Raises:
            EtcdStartError: as `start()`.
        """
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        """Stop etcd and remove the temporary directory if this object created it."""
        self.stop()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
            self._data_dir = None
            self._log_file = None
            self._ports = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.endpoint if self._ports is not None else "not started"
        return f"EtcdServer({self._name!r}, {where}, pid={self.pid})"

    # -- administration ------------------------------------------------------------------

    def enable_auth(self, user: str, password: str) -> None:
        """Turn on etcd's authentication, with `root` and `user` sharing `password`.

        Creates the `root` user (and `user`, unless it is root), grants both the root role
        (full access), and enables auth. Runs `etcdctl` against this server, with the TLS
        flags when the client port is TLS.

        Raises:
            ConfigError: etcdctl was not found.
            EtcdctlError: a command failed (the user exists already, auth is on already...).
        """
        users = ["root"] if user == "root" else ["root", user]
        for name in users:
            # The password goes through stdin, not the command line where `ps` would show it.
            self.etcdctl("user", "add", name, "--interactive=false", stdin=password)
            self.etcdctl("user", "grant-role", name, "root")
        self.etcdctl("auth", "enable")
        log.info("etcd auth enabled at %s for users %s", self.endpoint, ", ".join(users))

    def etcdctl(
        self,
        *args: str,
        user: str | None = None,
        password: str | None = None,
        stdin: str | None = None,
        timeout: float = _ETCDCTL_TIMEOUT,
    ) -> str:
        """Run `etcdctl` (API v3) against this server, with its endpoint and TLS flags.

        Args:
            args: the command and its arguments, e.g. ("put", "k", "v").
            user: authenticate as this user (with `password`).
            password: the user's password.
            stdin: text fed to etcdctl's standard input.
            timeout: deadline for the whole command, in seconds.

        Returns:
            etcdctl's standard output.

        Raises:
            ConfigError: etcdctl was not found.
            EtcdctlError: etcdctl exited non-zero or ran past the deadline.
        """
        cmd = [find_etcdctl_binary(self._binary), f"--endpoints={self.endpoint}"]
        cmd += [f"--dial-timeout={max(timeout / 2, 0.5):.1f}s", f"--command-timeout={timeout:.1f}s"]
        if self._tls is not None:
            cmd.append(f"--cacert={self._tls.ca_file}")
            if self._tls.client_cert_auth:
                cert, key = self._tls.own_client_cert
                cmd += [f"--cert={cert}", f"--key={key}"]
        if user is not None:
            cmd.append(f"--user={user}")
            if password is not None:
                cmd.append(f"--password={password}")
        cmd += args
        env = {**os.environ, "ETCDCTL_API": "3"}
        try:
            done = subprocess.run(
                cmd,
                input=stdin.encode() if stdin is not None else None,
                capture_output=True,
                env=env,
                timeout=timeout + 1.0,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise EtcdctlError(f"etcdctl {' '.join(args)} ran past {timeout:.1f} s") from exc
        if done.returncode != 0:
            message = done.stderr.decode(errors="replace").strip()
            raise EtcdctlError(f"etcdctl {' '.join(args)} failed ({done.returncode}): {message}")
        return done.stdout.decode(errors="replace")

    # -- internals -----------------------------------------------------------------------

    def _require_ports(self) -> tuple[int, int]:
        if self._ports is None:
            raise errors.EtcdError("the ports are chosen by the first start()")
        return self._ports

    def _prepare_dirs(self) -> None:
        if self._data_dir is None:
            if self._given_data_dir is not None:
                self._data_dir = self._given_data_dir
            else:
                self._temp_dir = Path(tempfile.mkdtemp(prefix="weft-etcd-"))
                self._data_dir = self._temp_dir / "data"
        if self._log_file is None:
            self._log_file = self._given_log_file or self._data_dir.parent / f"{self._name}.log"
        self._data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._log_file.parent.mkdir(parents=True, exist_ok=True)

    def _command(self) -> list[str]:
        peer_url = f"http://{_LOOPBACK}:{self.peer_port}"
        cmd = [
            self._binary,
            f"--name={self._name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.endpoint}",
            f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster={self._name}={peer_url}",
            "--initial-cluster-state=new",
            "--heartbeat-interval=100",
            "--election-timeout=1000",
            f"--quota-backend-bytes={_QUOTA_BACKEND_BYTES}",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        if self._tls is not None:
            cmd += [f"--cert-file={self._tls.cert_file}", f"--key-file={self._tls.key_file}"]
            if self._tls.client_cert_auth:
                cmd += ["--client-cert-auth", f"--trusted-ca-file={self._tls.ca_file}"]
        return cmd

    def _start_once(self, deadline: float) -> None:
        if self._ports is None:
            client_port, peer_port = free_loopback_ports(2)
            self._ports = (client_port, peer_port)
        log_file = self._log_file
        assert log_file is not None  # set by _prepare_dirs
        cmd = self._command()
        with log_file.open("ab") as sink:
            self._log_offset = sink.tell()
            log.info("starting etcd at %s (data %s, log %s)", self.endpoint, self.data_dir, log_file)
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
                start_new_session=True,
            )
        try:
            self._wait_healthy(self._proc, deadline)
        except BaseException:
            self.kill()
            raise
        log.info("etcd pid %d healthy at %s", self._proc.pid, self.endpoint)

    def _wait_healthy(self, proc: subprocess.Popen[bytes], deadline: float) -> None:
        context = self._ssl_context()
        last_error = "no answer yet"
        while True:
            code = proc.poll()
            if code is not None:
                raise EtcdStartError(f"etcd exited with status {code} while starting", self._log_tail())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EtcdStartError(
                    f"etcd at {self.endpoint} was not healthy in time ({last_error})", self._log_tail()
                )
            problem = self._probe(context, min(_PROBE_TIMEOUT, remaining))
            if problem is None:
                return
            last_error = problem
            time.sleep(min(_POLL_INTERVAL, max(deadline - time.monotonic(), 0.0)))

    def _probe(self, context: ssl.SSLContext | None, timeout: float) -> str | None:
        """GET /health once; None when healthy, else what went wrong."""
        conn: http.client.HTTPConnection
        if context is None:
            conn = http.client.HTTPConnection(_LOOPBACK, self.client_port, timeout=timeout)
        else:
            conn = http.client.HTTPSConnection(_LOOPBACK, self.client_port, timeout=timeout, context=context)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        try:
            healthy = response.status == 200 and json.loads(body).get("health") == "true"
        except (ValueError, AttributeError):
            healthy = False
        return None if healthy else f"/health answered {response.status}: {body[:200]!r}"

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self._tls is None:
            return None
        context = ssl.create_default_context(cafile=str(self._tls.ca_file))
        if self._tls.client_cert_auth:
            cert, key = self._tls.own_client_cert
            context.load_cert_chain(str(cert), str(key))
        return context

    def _log_tail(self) -> str:
        if self._log_file is None:
            return ""
        try:
            with self._log_file.open("rb") as source:
                size = source.seek(0, os.SEEK_END)
                source.seek(max(self._log_offset, size - _LOG_TAIL_BYTES))
                return source.read().decode(errors="replace").strip()
        except OSError:
            return ""

    @staticmethod
    def _kill_and_wait(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        try:
            proc.wait(_KILL_WAIT)
        except subprocess.TimeoutExpired as exc:
            raise errors.EtcdError(f"etcd pid {proc.pid} did not exit {_KILL_WAIT} s after SIGKILL") from exc
