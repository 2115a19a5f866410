"""Running the commands the e2e layer drives (docker, kind, kubectl, ip, iptables, pip): one
way, with a deadline on every call and stderr kept for the error."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence


class CommandError(subprocess.CalledProcessError):
    """A command that failed; its message carries the tail of its stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{str(self.stderr or '')[-3000:]}"


def run(
    argv: Sequence[str],
    timeout: float = 60.0,
    *,
    input: str | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run `argv` to its end within `timeout` seconds; its stdout.

    Raises:
        CommandError: it exited non-zero (and `check`).
        subprocess.TimeoutExpired: it ran past `timeout`.
    """
    done = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, input=input, check=False,
        env=None if env is None else dict(env),
    )  # fmt: skip
    if check and done.returncode != 0:
        raise CommandError(done.returncode, done.args, done.stdout, done.stderr)
    return done.stdout


def succeeds(argv: Sequence[str], timeout: float = 60.0) -> bool:
    """Whether `argv` exits 0 (a probe: `docker image inspect`, `ip link show`, ...)."""
    return subprocess.run(list(argv), capture_output=True, timeout=timeout, check=False).returncode == 0


def isolate_argv(pid: str, on: bool) -> list[list[str]]:
    """The iptables commands that cut the network namespace of process `pid` off everything
    but loopback (`on`), or remove that cut; to be run on the host that owns the process."""
    op = "-I" if on else "-D"
    return [
        ["nsenter", "-t", pid, "-n", "iptables", op, chain, "!", iface, "lo", "-j", "DROP"]
        for chain, iface in (("INPUT", "-i"), ("OUTPUT", "-o"))
    ]
