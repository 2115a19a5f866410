"""The load an engine reports: gauges it sets, latencies it observes, one snapshot to publish.

The engine updates figures as it serves (from any thread: a lock guards them); the SDK
publishes a snapshot as the member's ``load/<name>`` record, which the leader's role policy
and the operator's autoscaler read, and renders the same figures on /metrics. Latency
percentiles cover the last `window` seconds (at most `max_samples` of each kind), so a burst
that ended no longer holds a role flip or a scale-up in place.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from weft.api.records import Percentiles

DEFAULT_WINDOW = 30.0
DEFAULT_MAX_SAMPLES = 4096


@dataclass(frozen=True)
class LoadReport:
    """One snapshot of an engine's load (the fields of the load record)."""

    queue_depth: int = 0
    """Requests waiting to start."""
    running: int = 0
    """Requests being served."""
    kv_cache_usage: float = 0.0
    """Fraction of the KV-cache blocks in use, 0..1."""
    ttft_ms: Percentiles | None = None
    itl_ms: Percentiles | None = None
    tokens_per_s: float = 0.0


def percentiles(samples: list[float]) -> Percentiles | None:
    """p50/p90/p99 by the nearest-rank method (None for no samples)."""
    if not samples:
        return None
    ordered = sorted(samples)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]

    return Percentiles(p50=rank(0.50), p90=rank(0.90), p99=rank(0.99))


class LoadTracker:
    """Thread-safe load figures of one engine.

    Args:
        window: seconds of latency samples the percentiles cover.
        max_samples: cap on the samples kept per kind (the oldest go first).
    """

    def __init__(self, window: float = DEFAULT_WINDOW, max_samples: int = DEFAULT_MAX_SAMPLES) -> None:
        if window <= 0 or max_samples < 1:
            raise ValueError("a load window needs window > 0 s and max_samples >= 1")
        self.window = window
        self._lock = threading.Lock()
        self._queue_depth = 0
        self._running = 0
        self._kv = 0.0
        self._ttft: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._itl: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._tokens: deque[tuple[float, int]] = deque(maxlen=max_samples)
        self._measured: tuple[Percentiles | None, Percentiles | None, float | None] | None = None
        self.version = 0
        """Bumped on every update: the publisher skips unchanged snapshots."""

    def set(
        self,
        *,
        queue_depth: int | None = None,
        running: int | None = None,
        kv_cache_usage: float | None = None,
    ) -> None:
        """Set the gauges given (None: leave as is).

        Raises:
            ValueError: a count below 0, a usage outside 0..1.
        """
        if (queue_depth is not None and queue_depth < 0) or (running is not None and running < 0):
            raise ValueError("queue_depth and running are counts (>= 0)")
        if kv_cache_usage is not None and not 0.0 <= kv_cache_usage <= 1.0:
            raise ValueError(f"kv_cache_usage {kv_cache_usage} is not a fraction in 0..1")
        with self._lock:
            if queue_depth is not None:
                self._queue_depth = int(queue_depth)
            if running is not None:
                self._running = int(running)
            if kv_cache_usage is not None:
                self._kv = float(kv_cache_usage)
            self.version += 1

    def set_latencies(
        self, ttft_ms: Percentiles | None, itl_ms: Percentiles | None, tokens_per_s: float | None = None
    ) -> None:
        """Percentiles (and throughput) measured elsewhere, such as from an engine's own
        metrics; they replace the ones from observed samples until the next call."""
        with self._lock:
            self._measured = (ttft_ms, itl_ms, tokens_per_s)
            self.version += 1

    def observe_ttft(self, ms: float) -> None:
        """One request's time to first token, in milliseconds."""
        self._observe(self._ttft, ms)

    def observe_itl(self, ms: float, tokens: int = 1) -> None:
        """One inter-token latency (milliseconds) and the tokens produced with it."""
        self._observe(self._itl, ms)
        with self._lock:
            self._tokens.append((time.monotonic(), max(int(tokens), 0)))

    def _observe(self, into: deque[tuple[float, float]], ms: float) -> None:
        if not 0.0 <= ms < 1e9:
            raise ValueError(f"a latency of {ms} ms is out of range")
        with self._lock:
            into.append((time.monotonic(), float(ms)))
            self.version += 1

    def snapshot(self) -> LoadReport:
        """The figures now; latencies and throughput over the last `window` seconds."""
        now = time.monotonic()
        since = now - self.window
        with self._lock:
            ttft = [v for t, v in self._ttft if t >= since]
            itl = [v for t, v in self._itl if t >= since]
            tokens = [(t, n) for t, n in self._tokens if t >= since]
            queue_depth, running, kv = self._queue_depth, self._running, self._kv
            measured = self._measured
        rate = 0.0
        if tokens:
            span = max(now - tokens[0][0], 1.0)  # a first burst is not an infinite rate
            rate = sum(n for _, n in tokens) / span
        if measured is not None:
            return LoadReport(queue_depth, running, kv, measured[0], measured[1], measured[2] or rate)
        return LoadReport(queue_depth, running, kv, percentiles(ttft), percentiles(itl), rate)
