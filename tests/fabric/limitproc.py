"""A target agent in its own process whose descriptor limit a test can lower and raise.

Run as ``python -m tests.fabric.limitproc``. It prints one JSON line (port, metadata as hex),
then answers commands on stdin, one JSON line each:

- ``limit N``: lower RLIMIT_NOFILE to the descriptors open now plus N;
- ``unlimit``: restore the original limit;
- ``state``: the agent's ``health()``, ``limits_hit()`` and the first bytes of region "kv";
- ``quit``: close the agent and exit.

Its log (WARNING and up) goes to stderr, for the test to count episode lines.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import sys

from tests.conftest import SECRET
from weft import Agent, AgentConfig

KV_BYTES = 4096


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
    config = AgentConfig(["tcp"], secret=SECRET, handshake_timeout=60.0, max_unauthenticated=100000)
    original = resource.getrlimit(resource.RLIMIT_NOFILE)
    with Agent("target", config) as agent:
        kv = agent.alloc(KV_BYTES, "kv")
        print(json.dumps({"port": agent.port, "metadata": agent.metadata().hex()}), flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            if cmd[0] == "limit":
                open_now = len(os.listdir("/proc/self/fd"))
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + int(cmd[1]), original[1]))
                reply: dict[str, object] = {"soft": open_now + int(cmd[1])}
            elif cmd[0] == "unlimit":
                resource.setrlimit(resource.RLIMIT_NOFILE, original)
                reply = {"soft": original[0]}
            else:
                reply = {
                    "health": list(agent.health()),
                    "limits": dataclasses.asdict(agent.limits_hit()),
                    "kv": bytes(kv.buffer[:16]).hex(),
                }
            print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
