"""A weft agent in a separate OS process, driven over a Pipe (test helper).

The child owns real registered memory; the test asks it to fill regions with a seeded
pattern, to checksum them, and to wait for notifications, so every byte a test moves is
checked on the far side of a real process boundary.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import signal
import traceback
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from tests import signals

RNG_PATTERN_CACHE: dict[tuple[int, int], np.ndarray] = {}


def pattern(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def digest(data: Any) -> str:
    return hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).hexdigest()


def _serve(conn: Connection, name: str, config: dict[str, Any]) -> None:
    from weft import Agent, AgentConfig

    backends = config.pop("backends", ["local", "tcp"])
    agent = Agent(name, AgentConfig(backends, **config))
    arrays: dict[str, np.ndarray] = {}
    regs: dict[str, Any] = {}
    conn.send(("ready", os.getpid()))
    while True:
        cmd, *args = conn.recv()
        try:
            if cmd == "quit":
                agent.close()
                conn.send(("ok", None))
                return
            result: Any = None
            if cmd == "metadata":
                result = agent.metadata()
            elif cmd == "register":
                rname, size, seed = args
                arr = pattern(size, seed) if seed is not None else np.zeros(size, np.uint8)
                arrays[rname] = arr
                regs[rname] = agent.register(arr, name=rname)
                result = agent.metadata()
            elif cmd == "release":
                regs.pop(args[0]).release()
            elif cmd == "digest":
                rname, off, length = args
                result = digest(arrays[rname][off : off + length])
            elif cmd == "digest_pairs":
                rname, pairs = args
                arr = arrays[rname]
                result = digest(np.concatenate([arr[o : o + n] for o, n in pairs]))
            elif cmd == "fill":
                rname, seed = args
                arrays[rname][:] = pattern(arrays[rname].size, seed) if seed is not None else 0
            elif cmd == "wait_notification":
                peer, message, timeout = args
                result = agent.wait_notification(peer, message, timeout=timeout)
            elif cmd == "notifications":
                result = agent.get_notifications()
            elif cmd == "add_peer":
                result = agent.add_peer(args[0])
            elif cmd == "notify":
                agent.send_notification(args[0], args[1])
            else:
                raise ValueError(f"unknown command {cmd}")
            conn.send(("ok", result))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class PeerProcess:
    """Handle on a child process running one agent."""

    def __init__(self, name: str, **config: Any) -> None:
        ctx = mp.get_context("spawn")
        self.name = name
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, name, config), daemon=True)
        self.proc.start()
        child.close()
        status, self.pid = self._recv(60)
        assert status == "ready"

    def _recv(self, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"peer process {self.name} did not answer within {timeout} s")
        return self._conn.recv()

    def call(self, cmd: str, *args: Any, timeout: float = 60) -> Any:
        self._conn.send((cmd, *args))
        status, result = self._recv(timeout)
        if status != "ok":
            raise RuntimeError(f"peer {self.name}: {result}")
        return result

    def send(self, cmd: str, *args: Any) -> None:
        """Start a command without waiting (collect with `result`)."""
        self._conn.send((cmd, *args))

    def result(self, timeout: float = 60) -> Any:
        status, result = self._recv(timeout)
        if status != "ok":
            raise RuntimeError(f"peer {self.name}: {result}")
        return result

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig`; a SIGSTOP returns once the whole process is stopped."""
        signals.send(self.pid, sig)

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(Exception):
                self.call("quit", timeout=10)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self._conn.close()
