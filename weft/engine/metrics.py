"""Prometheus metrics of one node agent: the only module that imports prometheus_client.

Why a private registry: the process may host other libraries with their own metrics, and
tests create several agents in one process; nothing here touches prometheus_client's global
registry. Values are read from the `Membership` object when scraped (its counters are plain
integers it already keeps), so nothing in the membership code knows about Prometheus.

Exposed (all prefixed ``weft_``):

* gauges ``members`` (members in this agent's view, itself included), ``ready`` (can serve
  transfers, `weft.engine.readiness`), ``not_ready{reason}`` (1 for the reason it cannot),
  ``fenced``, ``leader`` (1 while this agent leads), ``lease_ttl_seconds`` (the TTL etcd
  granted), ``etcd_reachable``, ``etcd_connected`` and ``etcd_lost_seconds`` (the etcd
  condition, apart from readiness), and ``info`` (1, labelled with name, namespace, group and
  generation);
* counters a user of the SDK adds (`AgentMetrics.add_counter`), such as the daemon's
  ``notifications_dropped_total``;
* counters ``peer_adds_total``, ``peer_removes_total``, ``fences_total``, ``rejoins_total``,
  ``ignored_records_total``, ``watch_restarts_total`` (from ``Membership.counters``);
* counters ``transfers_total``, ``transfer_bytes_total``, ``transfer_errors_total``: what
  the fabric `Agent` posted (`Agent.stats`), plus anything counted with
  `AgentMetrics.count_transfer`; ``served_total``, ``served_bytes_total``, ``refused_total``:
  requests peers made of this agent over tcp/ucx;
* histogram ``detection_seconds{signal}``: how long after the data path lost a peer it was
  removed, by the signal that removed it (``data-path`` or ``etcd``);
* with an engine's load (`weft.engine.load.LoadTracker`): gauges ``engine_queue_depth``,
  ``engine_running``, ``engine_kv_cache_usage``, ``engine_tokens_per_second``,
  ``engine_ttft_ms{quantile}`` and ``engine_itl_ms{quantile}`` (the figures of the load record);
* with a plan follower: ``plan_epoch_applied``, ``role{role}`` (1 for the role served) and
  ``change_overdue`` (1 while the engine is past the deadline of a switch or drain).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from weft.api.records import Percentiles
from weft.engine import readiness
from weft.engine.load import LoadTracker
from weft.membership.member import Membership, Phase

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The content type of `AgentMetrics.render` (Prometheus text exposition format 0.0.4)."""

DETECTION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0)

_COUNTERS = {
    "peer_adds": "Peers added to this agent's view (a new member or a new generation).",
    "peer_removes": "Peers removed from this agent's view (left, lease expired, data path lost).",
    "fences": "Times this agent fenced itself (lease lost, key deleted, paused past its lease).",
    "rejoins": "Times this agent rejoined the group as a new generation after a fence.",
    "ignored_records": "etcd records under the group's prefix ignored as invalid or unsigned.",
    "watch_restarts": "Times the etcd watch broke and the group was re-read.",
}


class _Histogram:
    """Cumulative bucket counts and a sum, per label value (what the exposition needs)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.series: dict[str, tuple[list[int], list[float]]] = {}  # label -> (counts, [sum])

    def observe(self, label: str, value: float) -> None:
        counts, total = self.series.setdefault(label, ([0] * (len(self.buckets) + 1), [0.0]))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
        counts[-1] += 1  # +Inf
        total[0] += value

    def family(self, name: str, doc: str, label: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=[label])
        bounds = [repr(b) for b in self.buckets] + ["+Inf"]
        for value, (counts, total) in sorted(self.series.items()):
            family.add_metric([value], list(zip(bounds, [float(c) for c in counts], strict=True)), total[0])
        return family


class AgentMetrics(Collector):
    """The metrics of one agent, on a registry of their own; read from the membership on scrape.

    Args:
        membership: the agent's membership.
        load: the engine's load figures, if an engine reports any.
        plan: reads the plan follower's (applied epoch, role, overdue), if there is one.
    """

    def __init__(
        self,
        membership: Membership,
        load: LoadTracker | None = None,
        plan: Callable[[], tuple[int, str | None, bool]] | None = None,
        ready: readiness.Readiness | None = None,
    ) -> None:
        self.membership = membership
        self.load = load
        self.plan = plan
        self.readiness = ready if ready is not None else readiness.Readiness(membership)
        self._counters: dict[str, tuple[str, Callable[[], float]]] = {}
        self.transfers = 0
        self.transfer_bytes = 0
        self.transfer_errors = 0
        self._detection = _Histogram(DETECTION_BUCKETS)
        self._last_detection: tuple[str, float] | None = None
        self.registry = prometheus_client.CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def add_counter(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """Export ``weft_<name>_total``, its value read by `read()` on every scrape.

        Raises:
            ValueError: `name` is exported already.
        """
        if name in self._counters or name in _COUNTERS:
            raise ValueError(f"the counter {name!r} is exported already")
        self._counters[name] = (doc, read)

    def count_transfer(self, nbytes: int, ok: bool) -> None:
        """Count one transfer the daemon made that has ended."""
        self.transfers += 1
        if ok:
            self.transfer_bytes += nbytes
        else:
            self.transfer_errors += 1

    def refresh(self) -> None:
        """Observe the detections the membership recorded since the last refresh.

        ``Membership.detections`` is a bounded deque of ``(signal, seconds)``; the newest entry
        seen is remembered by identity, so equal values are still counted once each. Entries
        pushed out of the deque between two scrapes (over 1000) are lost.
        """
        detections = self.membership.detections
        if not detections:
            return
        fresh: list[tuple[str, float]] = []
        for item in reversed(detections):
            if item is self._last_detection:
                break
            fresh.append(item)
        self._last_detection = detections[-1]
        for signal, seconds in reversed(fresh):
            self._detection.observe(signal, max(seconds, 0.0))

    def render(self) -> bytes:
        """The text exposition of every metric, values as of now."""
        self.refresh()
        return prometheus_client.generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        """For the registry: every metric, read now."""
        m = self.membership
        fenced = m.phase is Phase.FENCED or (m.agent is not None and m.agent.fenced)
        verdict = self.readiness.verdict()
        etcd = self.readiness.etcd()
        lost = 0.0 if etcd.lost_since is None else max(time.time() - etcd.lost_since, 0.0)
        gauges = (
            ("members", "Members in this agent's view of the group, itself included.", len(m.members)),
            ("ready", "1 while this agent can serve transfers (/readyz answers 200).", verdict is None),
            ("etcd_connected", "1 while etcd confirms the lease and feeds the view.", etcd.connected),
            ("etcd_lost_seconds", "Seconds since etcd was lost (0 while connected).", lost),
            ("fenced", "1 while this agent is fenced (serves nothing, waits to rejoin).", fenced),
            ("leader", "1 while this agent is the group's leader.", m.is_leader),
            ("lease_ttl_seconds", "TTL of this agent's member lease, as etcd granted it.", m.lease_ttl),
            ("etcd_reachable", "1 while etcd answers this agent's lease keep-alives.", m.etcd_reachable),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"weft_{name}", doc, value=float(value))
        why = GaugeMetricFamily(
            "weft_not_ready", "1 for the reason this agent is not ready (none: ready).", labels=["reason"]
        )
        kinds = list(readiness.REASONS) + [k for k, _ in self.readiness.checks if k not in readiness.REASONS]
        for kind in kinds:
            why.add_metric([kind], float(verdict is not None and verdict.kind == kind))
        yield why
        info = GaugeMetricFamily(
            "weft_info", "This agent: 1, labelled.", labels=["name", "namespace", "group", "generation"]
        )
        group = m.config.group
        info.add_metric([m.config.name, group.namespace, group.group, str(m.generation)], 1.0)
        yield info
        for key, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"weft_{key}", doc, value=float(m.counters.get(key, 0)))
        for key, (doc, read) in self._counters.items():
            yield CounterMetricFamily(f"weft_{key}", doc, value=float(read()))
        fabric = m.agent.stats() if m.agent is not None else {}
        transfers = (
            ("transfers", "Transfers this agent posted.", self.transfers + fabric.get("transfers", 0)),
            (
                "transfer_bytes",
                "Bytes of the transfers this agent posted.",
                self.transfer_bytes + fabric.get("bytes", 0),
            ),
            (
                "transfer_errors",
                "Transfers this agent posted that failed.",
                self.transfer_errors + fabric.get("errors", 0),
            ),
            (
                "served",
                "Requests peers made of this agent that it served (tcp, ucx).",
                fabric.get("served", 0),
            ),
            ("served_bytes", "Bytes of the requests this agent served.", fabric.get("served_bytes", 0)),
            ("refused", "Requests peers made of this agent that it refused.", fabric.get("refused", 0)),
        )
        for name, doc, count in transfers:
            yield CounterMetricFamily(f"weft_{name}", doc, value=float(count))
        yield self._detection.family(
            "weft_detection_seconds",
            "Seconds from the data path losing a peer to its removal, by the signal that removed it.",
            "signal",
        )
        yield from self._engine()

    def _engine(self) -> Iterator[Metric]:
        """The engine's load and its place in the plan (when there is an engine)."""
        if self.load is not None:
            r = self.load.snapshot()
            for name, doc, value in (
                ("queue_depth", "Requests waiting to start.", r.queue_depth),
                ("running", "Requests being served.", r.running),
                ("kv_cache_usage", "Fraction of the KV-cache blocks in use.", r.kv_cache_usage),
                ("tokens_per_second", "Tokens produced per second, recently.", r.tokens_per_s),
            ):
                yield GaugeMetricFamily(f"weft_engine_{name}", doc, value=float(value))
            for name, doc, p in (
                ("ttft_ms", "Recent time to first token, milliseconds.", r.ttft_ms),
                ("itl_ms", "Recent inter-token latency, milliseconds.", r.itl_ms),
            ):
                family = GaugeMetricFamily(f"weft_engine_{name}", doc, labels=["quantile"])
                if p is not None:
                    for q, v in (("0.5", p.p50), ("0.9", p.p90), ("0.99", p.p99)):
                        family.add_metric([q], v)
                yield family
        if self.plan is not None:
            epoch, role, overdue = self.plan()
            yield GaugeMetricFamily("weft_plan_epoch_applied", "Plan epoch applied and acked.", value=epoch)
            roles = GaugeMetricFamily("weft_role", "1 for the role this member serves.", labels=["role"])
            for served in ("prefill", "decode"):
                roles.add_metric([served], 1.0 if role == served else 0.0)
            yield roles
            yield GaugeMetricFamily(
                "weft_change_overdue",
                "1 while the engine is past the deadline of a switch or drain it was asked for.",
                value=float(overdue),
            )


# -- an engine's own metrics, scraped (sidecar mode) -------------------------------------------
# The names engines export, first match wins: vLLM (v0 and v1 spellings), SGLang, and weft's
# own (an engine that renders `AgentMetrics`).
_GAUGES: dict[str, tuple[str, ...]] = {
    "queue_depth": ("vllm:num_requests_waiting", "sglang:num_queue_reqs", "weft_engine_queue_depth"),
    "running": ("vllm:num_requests_running", "sglang:num_running_reqs", "weft_engine_running"),
    "kv_cache_usage": (
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "sglang:token_usage",
        "weft_engine_kv_cache_usage",
    ),
}
_HISTOGRAMS: dict[str, tuple[str, ...]] = {
    "ttft": ("vllm:time_to_first_token_seconds", "sglang:time_to_first_token_seconds"),
    "itl": (
        "vllm:inter_token_latency_seconds",
        "vllm:time_per_output_token_seconds",
        "sglang:inter_token_latency_seconds",
        "sglang:time_per_output_token_seconds",
    ),
}
_TOKENS = ("vllm:generation_tokens", "sglang:generation_tokens")


class EngineScrape:
    """Load figures from an engine's Prometheus text, for engines that do not import weft.

    Gauges are summed over label sets (one engine may serve several models); latency
    percentiles come from the histogram buckets that filled since the previous scrape (as
    PromQL's ``histogram_quantile`` over a rate: linear within a bucket), so they describe
    recent requests, not the engine's whole life; tokens per second from the token counter.
    """

    def __init__(self) -> None:
        self._buckets: dict[str, dict[float, float]] = {}
        self._tokens: tuple[float, float] | None = None  # (monotonic time, counter)

    def read(self, text: str, now: float) -> dict[str, Any]:
        """The figures in `text` (keys of `LoadTracker.set` and `LoadTracker.set_latencies`).

        Raises:
            ValueError: `text` is not Prometheus text exposition.
        """
        families = {f.name: f for f in text_string_to_metric_families(text)}
        out: dict[str, Any] = {}
        for key, names in _GAUGES.items():
            family = next((families[n] for n in names if n in families), None)
            if family is not None:
                value = sum(s.value for s in family.samples)
                out[key] = min(max(value, 0.0), 1.0) if key == "kv_cache_usage" else max(int(value), 0)
        for key, names in _HISTOGRAMS.items():
            name = next((n for n in names if n in families), None)
            if name is not None:
                out[key] = self._recent_percentiles(name, families[name].samples)
        # a counter's family drops "_total" when its TYPE line has it, keeps it otherwise
        spellings = [name for base in _TOKENS for name in (base, base + "_total")]
        counter = next((families[name] for name in spellings if name in families), None)
        if counter is not None:
            total = sum(s.value for s in counter.samples if s.name.endswith("_total"))
            if self._tokens is not None and now > self._tokens[0] and total >= self._tokens[1]:
                out["tokens_per_s"] = (total - self._tokens[1]) / (now - self._tokens[0])
            self._tokens = (now, total)
        return out

    def _recent_percentiles(self, name: str, samples: Any) -> Percentiles | None:
        cumulative: dict[float, float] = {}
        for s in samples:
            if s.name.endswith("_bucket"):
                bound = float(s.labels["le"])
                cumulative[bound] = cumulative.get(bound, 0.0) + s.value
        before = self._buckets.get(name, {})
        self._buckets[name] = cumulative
        delta = sorted((b, max(v - before.get(b, 0.0), 0.0)) for b, v in cumulative.items())
        if not delta or delta[-1][1] <= 0:
            return None  # no request finished since the last scrape

        def quantile(q: float) -> float:
            rank = q * delta[-1][1]
            lower, below = 0.0, 0.0
            for bound, count in delta:
                if count >= rank:
                    if math.isinf(bound):
                        return lower * 1000.0  # past the last finite bucket: its bound
                    share = (rank - below) / (count - below) if count > below else 1.0
                    return (lower + (bound - lower) * share) * 1000.0
                lower, below = bound, count
            return lower * 1000.0

        return Percentiles(p50=quantile(0.5), p90=quantile(0.9), p99=quantile(0.99))
