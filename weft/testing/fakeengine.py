"""A stand-in inference engine that does not import weft: the other half of sidecar mode.

It speaks what a real engine speaks to a sidecar `weft agent`: Prometheus metrics under
vLLM's names (``vllm:num_requests_waiting``, ``vllm:num_requests_running``,
``vllm:kv_cache_usage_perc``, ``vllm:time_to_first_token_seconds`` and
``vllm:inter_token_latency_seconds`` histograms, ``vllm:generation_tokens_total``), and the
agent's change hook (``POST /weft``). Tests and the chaos suite drive its load over HTTP::

    POST /load   {"waiting": 30, "running": 4, "kv": 0.5, "ttft_ms": 900, "itl_ms": 20}
    POST /hook   {"status": 200, "hold_seconds": 0}     # how /weft answers from now on
    GET  /state  -> {"role": ..., "changes": [...], "load": {...}}

Run: ``python -m weft.testing.fakeengine --host 127.0.0.1 --port 8000``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_BODY = 1 << 16


class FakeEngine:
    """The engine's state, shared by the request threads (a lock guards it)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.load: dict[str, float] = {"waiting": 0, "running": 0, "kv": 0.0, "ttft_ms": 0.0, "itl_ms": 0.0}
        self.ttft = [0] * (len(BUCKETS) + 1)
        self.itl = [0] * (len(BUCKETS) + 1)
        self.tokens = 0
        self.role: str | None = None
        self.changes: list[dict[str, Any]] = []
        self.hook_status = 200
        self.hold_seconds = 0.0

    def observe(self) -> None:
        """Each scrape sees one more request at the set latencies (so recent percentiles
        follow the load the driver set)."""
        for key, counts in (("ttft_ms", self.ttft), ("itl_ms", self.itl)):
            ms = self.load[key]
            if ms > 0:
                slot = next((i for i, b in enumerate(BUCKETS) if ms / 1000.0 <= b), len(BUCKETS))
                counts[slot] += 1
        self.tokens += int(self.load["running"]) * 10

    def metrics(self) -> str:
        with self.lock:
            self.observe()
            lines = [
                "# TYPE vllm:num_requests_waiting gauge",
                f'vllm:num_requests_waiting{{model_name="fake"}} {self.load["waiting"]}',
                "# TYPE vllm:num_requests_running gauge",
                f'vllm:num_requests_running{{model_name="fake"}} {self.load["running"]}',
                "# TYPE vllm:kv_cache_usage_perc gauge",
                f'vllm:kv_cache_usage_perc{{model_name="fake"}} {self.load["kv"]}',
                "# TYPE vllm:generation_tokens_total counter",
                f'vllm:generation_tokens_total{{model_name="fake"}} {self.tokens}',
            ]
            for name, counts in (
                ("vllm:time_to_first_token_seconds", self.ttft),
                ("vllm:inter_token_latency_seconds", self.itl),
            ):
                lines.append(f"# TYPE {name} histogram")
                total = 0
                for bound, n in zip([*map(str, BUCKETS), "+Inf"], counts, strict=True):
                    total += n
                    lines.append(f'{name}_bucket{{le="{bound}",model_name="fake"}} {total}')
                lines.append(f'{name}_count{{model_name="fake"}} {total}')
                lines.append(f'{name}_sum{{model_name="fake"}} 0')
        return "\n".join(lines) + "\n"

    def hook(self, change: dict[str, Any]) -> tuple[int, float]:
        with self.lock:
            status, hold = self.hook_status, self.hold_seconds
        time.sleep(hold)  # finishing the old role's requests
        with self.lock:
            self.changes.append({**change, "answered": status, "at": time.time()})
            if status == 200 and change.get("change") == "role":
                self.role = change.get("new")
        return status, hold


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self) -> dict[str, Any]:
        n = min(int(self.headers.get("Content-Length") or 0), MAX_BODY)
        data = json.loads(self.rfile.read(n) or b"{}")
        if not isinstance(data, dict):
            raise ValueError("a JSON object is expected")
        return data

    def do_GET(self) -> None:
        e = self.server.engine
        if self.path == "/metrics":
            self._reply(200, e.metrics().encode(), "text/plain; version=0.0.4")
        elif self.path == "/state":
            with e.lock:
                doc = {"role": e.role, "changes": e.changes[-200:], "load": e.load}
            self._reply(200, json.dumps(doc).encode())
        else:
            self._reply(404, b"{}")

    def do_POST(self) -> None:
        e = self.server.engine
        try:
            body = self._json()
        except ValueError as exc:
            self._reply(400, json.dumps({"error": str(exc)}).encode())
            return
        if self.path == "/weft":
            status, _ = e.hook(body)
            self._reply(status, b'{"ok": true}' if status == 200 else b'{"ok": false}')
        elif self.path == "/load":
            with e.lock:
                e.load.update({k: float(v) for k, v in body.items() if k in e.load})
            self._reply(200, b"{}")
        elif self.path == "/hook":
            with e.lock:
                e.hook_status = int(body.get("status", 200))
                e.hold_seconds = float(body.get("hold_seconds", 0.0))
            self._reply(200, b"{}")
        else:
            self._reply(404, b"{}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.engine = FakeEngine()


def serve(host: str = "127.0.0.1", port: int = 0) -> _Server:
    """Start serving in a daemon thread; ``server.server_address`` has the port. Stop with
    ``server.shutdown(); server.server_close()``."""
    server = _Server((host, port))
    threading.Thread(target=server.serve_forever, name="fake-engine", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    server = _Server((args.host, args.port))
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
