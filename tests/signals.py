"""Signals for tests that freeze or kill agent processes.

`kill(pid, SIGSTOP)` only queues the signal: Linux starts the group stop when one thread of the
process takes it, and on a busy machine that thread may wait for a CPU while the process's other
threads go on running (and serving requests) for a while. A test that relies on the freeze
therefore waits until every thread is stopped, with a deadline.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

STOP_TIMEOUT = 30.0
"""Seconds a stop may take before the test fails: scheduling delay only, so generous."""


def send(pid: int, sig: int, timeout: float = STOP_TIMEOUT) -> None:
    """Send `sig` to `pid`; for SIGSTOP, return once every thread of it is stopped.

    Raises:
        TimeoutError: some thread still runs after `timeout` seconds.
    """
    os.kill(pid, sig)
    if sig != signal.SIGSTOP:
        return
    deadline = time.monotonic() + timeout
    while not all_stopped(pid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} was sent SIGSTOP but is not stopped after {timeout} s")
        time.sleep(0.001)


def all_stopped(pid: int) -> bool:
    """True when every thread of `pid` is stopped (state T or t in /proc), or it is gone."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return True
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        state = stat[stat.rindex(")") + 2]  # the field after "(comm)", whose name may hold spaces
        if state not in "Tt":
            return False
    return True
