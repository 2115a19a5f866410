"""Run a command while busy-loop processes occupy the machine's CPUs.

weft's users run agents beside engines that keep every core busy, and CI machines share
theirs; a test that passes only on an idle machine waits on a timer where it should wait on
a condition. `make test-under-load` runs the timing-sensitive layers (expert parallelism,
membership, agent and engine processes) under this module, so such a test fails here first.

    python -m weft.testing.burn [--burners N] -- COMMAND [ARG...]

The burners are child processes in their own process group, at the same scheduling priority
as the command (a `nice`d burner would leave the tests an idle CPU whenever they want one,
which is exactly what a busy machine does not give). They stop when the command ends, when
this process is interrupted, and at the latest after `--limit` seconds; the exit status is
the command's.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

_DEFAULT_LIMIT_S = 3600.0


def _spin(stop_at: float) -> None:
    """Burn one CPU until `stop_at` (a `time.monotonic` instant), checking rarely."""
    x = 0
    while time.monotonic() < stop_at:
        for _ in range(100_000):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF


@contextlib.contextmanager
def burning(burners: int, limit_s: float = _DEFAULT_LIMIT_S) -> Iterator[list[int]]:
    """Keep `burners` CPUs busy while the block runs.

    Args:
        burners: how many busy-loop processes to start (one per core to occupy).
        limit_s: each burner stops by itself after this many seconds, whatever happens to
            its parent.

    Yields:
        The burners' process ids.

    Raises:
        ValueError: `burners` is negative or `limit_s` is not positive.
    """
    if burners < 0 or limit_s <= 0:
        raise ValueError(f"burners must be >= 0 and limit_s > 0, got {burners} and {limit_s}")
    ctx = multiprocessing.get_context("spawn")
    stop_at = time.monotonic() + limit_s
    procs = [ctx.Process(target=_spin, args=(stop_at,), daemon=True) for _ in range(burners)]
    for p in procs:
        p.start()
    try:
        yield [p.pid for p in procs if p.pid is not None]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.join(timeout=10)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command after ``--`` with the CPUs busy; return its exit status."""
    parser = argparse.ArgumentParser(prog="python -m weft.testing.burn", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--burners", type=int, default=os.cpu_count() or 1, help="busy processes (default: one per CPU)"
    )
    parser.add_argument(
        "--limit", type=float, default=_DEFAULT_LIMIT_S, help="seconds after which burners stop anyway"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    with burning(args.burners, args.limit) as pids:
        print(f"weft.testing.burn: {len(pids)} busy processes while running: {' '.join(command)}", flush=True)
        child = subprocess.Popen(command)
        try:
            return child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGINT)
            return child.wait()


if __name__ == "__main__":
    sys.exit(main())
