"""A small inference engine as an OS process, written only against `weft.engine`'s public names.

Run as ``python -m tests.engineproc`` with the ``WEFT_*`` environment the operator would
inject. It "serves" requests (each takes `REQUEST_SECONDS`), reports its load through the
SDK, and answers the SDK's handshakes the way a real engine must:

* a role switch first finishes every request it accepted (none is dropped), and, while the
  test holds the gate closed, waits before switching (so the test can see that the epoch is
  not acked before the engine switched);
* a drain (SIGTERM, scale-down) stops accepting and finishes what it accepted.

Commands on stdin, one per line: ``load WAITING`` (the queue depth it reports), ``submit N``
(accept N requests), ``gate open|closed``, ``ttft MS``. Events on stdout, one JSON object per
line: ``ready``, ``switch-begin``, ``switch-end``, ``accepted``, ``drain-begin``, ``drain-end``, ``exit``
(with ``accepted`` and ``completed`` counts).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
import time
from typing import Any

from weft.engine import DrainRequest, Engine, RoleChange

REQUEST_SECONDS = 0.3


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "at": time.time(), **fields}), flush=True)


class TestEngine:
    def __init__(self) -> None:
        self.engine = Engine.from_env()
        self.gate = asyncio.Event()
        self.gate.set()
        self.accepting = True
        self.accepted = 0
        self.completed = 0
        self.running: set[asyncio.Task[None]] = set()
        self.stop = asyncio.Event()
        self.engine.on_role_change(self.switch)
        self.engine.on_drain(self.drain)

    async def serve_one(self) -> None:
        await asyncio.sleep(REQUEST_SECONDS)
        self.completed += 1
        self.engine.load.set(running=len(self.running) - 1)

    def submit(self, n: int) -> None:
        for _ in range(n):
            if not self.accepting:
                return
            self.accepted += 1
            task = asyncio.get_running_loop().create_task(self.serve_one())
            self.running.add(task)
            task.add_done_callback(self.running.discard)
        self.engine.load.set(running=len(self.running))
        say("accepted", total=self.accepted)

    async def finish_running(self) -> None:
        while self.running:
            await asyncio.gather(*list(self.running))

    async def switch(self, change: RoleChange) -> None:
        say("switch-begin", epoch=change.epoch, old=change.old, new=change.new, running=len(self.running))
        if change.old is not None:
            self.accepting = False  # hand nothing new to the old role
            await self.finish_running()
            await self.gate.wait()
        self.accepting = True
        say("switch-end", epoch=change.epoch, new=change.new, completed=self.completed)

    async def drain(self, change: DrainRequest) -> None:
        say("drain-begin", why=change.why, running=len(self.running))
        self.accepting = False
        await self.finish_running()
        say("drain-end", completed=self.completed)

    def command(self, line: str) -> None:
        word, _, arg = line.strip().partition(" ")
        if word == "load":
            self.engine.load.set(queue_depth=int(arg))
        elif word == "submit":
            self.submit(int(arg))
        elif word == "gate":
            (self.gate.set if arg == "open" else self.gate.clear)()
        elif word == "ttft":
            self.engine.load.observe_ttft(float(arg))
        elif word == "quit":
            self.stop.set()

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)

        def read_stdin() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(self.command, line)

        threading.Thread(target=read_stdin, daemon=True).start()
        await self.engine.start()
        say("ready", name=self.engine.name, http_port=self.engine.http_port)
        await self.stop.wait()
        await self.engine.stop("SIGTERM")
        say("exit", accepted=self.accepted, completed=self.completed)
        return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(TestEngine().main()))
