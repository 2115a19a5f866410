"""The chaos scenarios, one layer for every driver, and the run that strings them together.

Each round injects one fault while checksummed KV traffic (`e2e.traffic`) runs and the group
is watched (`e2e.observe`), then waits for the group to be whole again. Measured per round:

- detection: fault to the first sign the group saw it (the member gone or replaced in etcd,
  etcd unreachable, the member count changing, the operator restarted);
- recovery: fault to the group whole again: the wanted members, a plan naming exactly them,
  acked by all (`observe.healthy`);
- throughput: bytes/s moved by the traffic between fault and recovery, over the 4 s before.

Invariants checked all along (any breach fails the run): no block lost or corrupt; plan epochs
only grow and never two plans for one epoch; every expert of the plan has a live replica or
is reported under-replicated within the lease TTL plus `EXPERT_GRACE`; the TransferGroup's
status agrees with etcd (members, plan epoch) within `STATUS_GRACE` while the operator runs.

    python -m e2e.scenarios --driver local --rounds 20      # `make e2e`
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e import report
from e2e.driver import Driver, Pod
from e2e.observe import Observer, View, expert_gaps, healthy
from e2e.traffic import Traffic
from weft.operator import children

log = logging.getLogger("e2e")
LEASE_TTL = 2
EXPERTS = 8
KV_POOL_BYTES = 32 << 20
EXPERT_GRACE = 5.0
STATUS_GRACE = 10.0
RECOVERY_DEADLINE = 120.0
BASELINE_SECONDS = 4.0
SETTLE_SECONDS = 3.0  # between rounds, so each baseline starts from a whole group
BACKOFF_LIMIT = 330.0  # the kubelet's restart back-off stops growing at 300 s


ENGINE_PORT = 8000
SETTLE_FLIPS = 5.0  # the load policy's settle time in the chaos group (roles.settleSeconds)
AUTOSCALING = {
    "enabled": True,
    "targets": {"queueDepthPerMember": 8},
    "behavior": {
        "scaleUp": {"stabilizationWindowSeconds": 0, "maxStep": 1},
        "scaleDown": {"stabilizationWindowSeconds": 10, "maxStep": 2},
    },
}
"""What the engine-load round switches on (and off after): the other rounds scale by hand.
Scale-down steps by 2, so the way back from maxReplicas (replicas + 2) is one decision and one
drain, not two of each (a CI run measured 132 s for the round with steps of 1)."""


def group_manifest(
    *,
    namespace: str,
    name: str,
    replicas: int,
    image: str,
    endpoints: list[str],
    token_secret: str,
    tls_secret: str | None = None,
    pull_policy: str = "IfNotPresent",
) -> dict[str, Any]:
    """The TransferGroup every scenario runs against: engine pods in sidecar mode (the
    stand-in engine of `weft.testing.fakeengine`, which does not import weft, and `weft agent`
    beside it reading its metrics and answering for it through its hook), GPU-less (host
    memory, TCP), roles by load (floor 1:1), `EXPERTS` experts twice each, a KV pool for the
    traffic on the pod's shared memory. `tls_secret`: the etcd client certificate's Secret
    (the chart's secure default), None for an etcd without TLS."""
    etcd: dict[str, Any] = {"endpoints": endpoints, "joinTokenSecretRef": {"name": token_secret}}
    if tls_secret is not None:
        etcd["tlsSecretRef"] = {"name": tls_secret}
    engine = {
        "name": "engine",
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": ["python", "-m", "weft.testing.fakeengine", "--port", str(ENGINE_PORT)],
        "ports": [{"name": "engine", "containerPort": ENGINE_PORT}],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
    }
    return {
        "apiVersion": "weft.dev/v1alpha1",
        "kind": "TransferGroup",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "minReplicas": replicas,
            "maxReplicas": replicas + 2,
            "roles": {"policy": "load", "minPrefill": 1, "minDecode": 1,
                      "gpuLessRoles": ["prefill", "decode"],
                      "highQueue": 8, "lowQueue": 2, "settleSeconds": SETTLE_FLIPS},
            "experts": {"count": EXPERTS, "replication": 2},
            "fabric": {"backends": ["tcp"], "kvPoolBytes": KV_POOL_BYTES},
            "failureDetection": {"leaseTtlSeconds": LEASE_TTL},
            "etcd": etcd,
            "engine": {
                "mode": "sidecar",
                "agent": {"image": image, "imagePullPolicy": pull_policy,
                          "resources": {"requests": {"cpu": "50m", "memory": "96Mi"}}},
                "metricsUrl": f"http://127.0.0.1:{ENGINE_PORT}/metrics",
                "hookUrl": f"http://127.0.0.1:{ENGINE_PORT}/weft",
                "sharedMemory": {"sizeLimit": f"{2 * KV_POOL_BYTES >> 20}Mi"},
            },
            "template": {"spec": {"containers": [engine]}},
        },
    }  # fmt: skip


@dataclass
class Round:
    round: int
    scenario: str
    t_fault: float
    t_heal: float | None = None
    detection_s: float | None = None
    recovery_s: float | None = None
    throughput_ratio: float | None = None
    failover_s: float | None = None  # kill-operator: SIGKILL to the other replica's reconcile done
    min_ready: int | None = None  # etcd-restart: fewest ready agent pods from fault to recovery
    violations: list[str] = field(default_factory=list)
    ok: bool = True


class Run:
    """A driver brought up, watched and faulted round after round."""

    def __init__(self, driver: Driver, *, rounds: int, seed: int, out: Path) -> None:
        self.driver, self.rounds, self.seed, self.out = driver, rounds, seed, out
        self.rng = random.Random(seed)
        self.replicas = getattr(driver, "replicas", 4)
        self.t0 = time.monotonic()
        self.timeline: dict[str, list[float]] = {"t": [], "throughput_mbps": [], "members": [], "ready": []}
        self.invariants: dict[str, dict[str, Any]] = {
            name: {"checks": 0, "violations": []} for name in ("blocks", "plans", "experts", "status")
        }
        self.results: list[Round] = []
        self._reported: dict[str, int] = {}  # invariant -> violations already put in a round
        self._stop = threading.Event()
        self._status: dict[str, Any] = {}
        self._operator_ready = True
        self._ready_pods: list[tuple[float, int]] = []  # (time, ready agent pods), every second
        self.observer: Observer | None = None
        self.traffic: Traffic | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        started = time.time()
        self.driver.up()
        log.info("cluster up in %.0f s", self.now())
        token = self.driver.join_token()
        tls = self.driver.etcd_tls(self.out / "etcd-client")
        log.info(
            "etcd at %s (%s)", self.driver.etcd_endpoint(), "TLS, client certificate" if tls else "no TLS"
        )
        self.observer = Observer(
            self.driver.etcd_endpoint(), self.driver.namespace, self.driver.group, token, tls
        )
        self.observer.start()
        self.wait("the group whole", lambda v: healthy(v, self.replicas), RECOVERY_DEADLINE)
        self.traffic = Traffic(self.observer, token, pool_bytes=KV_POOL_BYTES, seed=self.seed)
        self.traffic.start()
        watchers = [threading.Thread(target=f, daemon=True) for f in (self._sample, self._watch_status)]
        for w in watchers:
            w.start()
        time.sleep(BASELINE_SECONDS + 1)
        try:
            for i, name in enumerate(round_order(self.rng, list(SCENARIOS), self.rounds)):
                self.results.append(self.round(i, name))
        finally:
            self._stop.set()
            self.traffic.stop()
            self.observer.stop()
            for w in watchers:
                w.join(5)
        return self.report(started)

    def round(self, i: int, name: str) -> Round:
        assert self.observer is not None and self.traffic is not None
        v_before, blocks_before = len(self.observer.violations), len(self.traffic.violations)
        baseline = self.throughput_since(self.now() - BASELINE_SECONDS)
        r = Round(i, name, t_fault=self.now())
        log.info("round %d: %s (baseline %.1f MB/s)", i, name, baseline)
        try:
            SCENARIOS[name](self, r)
        except Exception as exc:  # a scenario that cannot finish is a failed round, not a crash
            log.exception("round %d (%s) failed", i, name)
            r.violations.append(f"{type(exc).__name__}: {exc}")
        if r.recovery_s is not None and baseline > 0:
            during = self.throughput_since(r.t_fault, r.t_fault + max(r.recovery_s, 0.5))
            r.throughput_ratio = round(during / baseline, 3)
        r.violations += self.observer.violations[v_before:] + self.traffic.violations[blocks_before:]
        r.violations += self._pop_watch_violations()
        r.ok = not r.violations and r.recovery_s is not None
        log.info("round %d: %s detection %s s recovery %s s throughput %s ok %s %s", i, name,
                 r.detection_s, r.recovery_s, r.throughput_ratio, r.ok, r.violations[:3])  # fmt: skip
        time.sleep(SETTLE_SECONDS)
        return r

    # -- helpers for scenarios -------------------------------------------------------------
    def view(self) -> View:
        assert self.observer is not None
        return self.observer.snapshot()

    def wait(self, what: str, pred: Callable[[View], bool], timeout: float) -> float:
        """Seconds until `pred(view)` held (raises TimeoutError)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if pred(self.view()):
                return time.monotonic() - start
            time.sleep(0.1)
        raise TimeoutError(f"{what}: not within {timeout:.0f} s (now {self.view().members.keys()})")

    def wait_for(self, what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
        """`probe()`'s first true answer within `timeout` (raises TimeoutError); an exception
        from the probe counts as a no (the API may be busy)."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(Exception):
                got = probe()
                if got:
                    return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout:.0f} s")
            time.sleep(interval)

    def ready_samples_after(self, t: float) -> bool:
        return any(at >= t for at, _ in self._ready_pods)

    def min_ready(self, start: float, end: float) -> int | None:
        """The fewest ready agent pods sampled between `start` and `end` (about one sample a
        second, from the pods' Ready conditions), or None without a sample."""
        during = [n for at, n in self._ready_pods if start <= at <= end]
        return min(during) if during else None

    def agent(self, name: str | None = None) -> Pod:
        pods = [p for p in self.driver.pods("agent") if p.ready]
        if name is not None:
            return next(p for p in self.driver.pods("agent") if p.name == name)
        return self.rng.choice(pods)

    def recover(self, r: Round, replicas: int, also: Callable[[View], bool] = lambda v: True) -> None:
        self.wait("recovery", lambda v: healthy(v, replicas) and also(v), RECOVERY_DEADLINE)
        r.recovery_s = round(self.now() - r.t_fault, 2)

    def detected(self, r: Round, pred: Callable[[View], bool], timeout: float = 60.0) -> None:
        self.wait("detection", pred, timeout)
        r.detection_s = round(self.now() - r.t_fault, 2)

    def save_logs(self, component: str, r: Round) -> None:
        """The component's log, into the output folder, for a look at how the round went."""
        for pod in self.driver.pods(component):
            text = self.driver.kubectl("logs", pod.name, "-n", self.driver.namespace, check=False, timeout=30)
            (self.out / f"round-{r.round:02d}-{pod.name}.log").write_text(text)

    def throughput_since(self, start: float, end: float | None = None) -> float:
        t, mbps = self.timeline["t"], self.timeline["throughput_mbps"]
        picked = [x for tt, x in zip(t, mbps, strict=False) if tt >= start and (end is None or tt <= end)]
        return sum(picked) / len(picked) if picked else 0.0

    # -- watchers ----------------------------------------------------------------------------
    def _sample(self) -> None:
        assert self.traffic is not None
        last_bytes, last_t, gap_since = self.traffic.counters.bytes, self.now(), None
        while not self._stop.wait(0.5):
            now, moved = self.now(), self.traffic.counters.bytes
            view = self.view()
            self.timeline["t"].append(round(now, 2))
            self.timeline["throughput_mbps"].append(round((moved - last_bytes) / (now - last_t) / 1e6, 3))
            self.timeline["members"].append(len(view.members))
            self.timeline["ready"].append(int(self._status.get("readyReplicas") or 0))
            last_bytes, last_t = moved, now
            inv = self.invariants["experts"]
            inv["checks"] += 1
            gaps = expert_gaps(view) if view.etcd_ok else []
            gap_since = (gap_since or now) if gaps else None
            if gap_since is not None and now - gap_since > LEASE_TTL + EXPERT_GRACE:
                inv["violations"].append(f"t={now:.1f}: experts {gaps} without a live replica, not reported")
                gap_since = None

    def _watch_status(self) -> None:
        wrong_since: float | None = None
        while not self._stop.wait(1.0):
            try:
                ns = self.driver.namespace
                found = json.loads(
                    self.driver.kubectl("get", "transfergroup,pods", "-n", ns, "-o", "json", timeout=10)
                )
            except Exception:
                continue
            operators, agents = [], 0
            for item in found.get("items", []):
                if item["kind"] == "TransferGroup" and item["metadata"]["name"] == self.driver.group:
                    self._status = item.get("status") or {}
                elif item["kind"] == "Pod":
                    conds = (item.get("status") or {}).get("conditions") or []
                    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conds)
                    labels = item["metadata"].get("labels") or {}
                    if labels.get("app.kubernetes.io/component") == "operator":
                        operators.append(ready)
                    elif labels.get(children.LABEL_GROUP) == self.driver.group:
                        agents += ready
            # the status may lag while a replica is down: another may still be taking over
            self._operator_ready = bool(operators) and all(operators)
            view, now = self.view(), self.now()
            self._ready_pods.append((now, agents))
            if not view.etcd_ok or not self._operator_ready:
                wrong_since = None
                continue
            inv = self.invariants["status"]
            inv["checks"] += 1
            truth = (len(view.members), view.plan.epoch if view.plan else None)
            shown = (self._status.get("members"), self._status.get("planEpoch"))
            if truth == shown:
                wrong_since = None
            elif wrong_since is None:
                wrong_since = now
            elif now - wrong_since > STATUS_GRACE:
                inv["violations"].append(
                    f"t={now:.1f}: status says {shown}, etcd {truth} for {STATUS_GRACE:.0f} s"
                )
                wrong_since = None

    def _pop_watch_violations(self) -> list[str]:
        """What the watchers found since the last round."""
        out: list[str] = []
        for name in ("experts", "status"):
            found = self.invariants[name]["violations"]
            out += found[self._reported.get(name, 0) :]
            self._reported[name] = len(found)
        return out

    def report(self, started: float) -> dict[str, Any]:
        assert self.observer is not None and self.traffic is not None
        c = self.traffic.counters
        self.invariants["blocks"] = {
            "checks": c.verified + c.written,
            "violations": list(self.traffic.violations),
        }
        self.invariants["plans"] = {
            "checks": self.observer.plan_checks,
            "violations": list(self.observer.violations),
        }
        return {
            "driver": self.driver.name,
            "started": started,
            "seed": self.seed,
            "duration_s": round(self.now(), 1),
            "rounds": [vars(r) for r in self.results],
            "timeline": self.timeline,
            "blocks": {
                "written": c.written,
                "verified": c.verified,
                "repaired": c.repaired,
                "failed_transfers": c.failed_transfers,
                "lost": c.lost,
                "corrupt": c.corrupt,
            },
            "invariants": self.invariants,
        }


# -- the scenarios -------------------------------------------------------------------------
def _gone_or_replaced(name: str, process: str) -> Callable[[View], bool]:
    return lambda v: name not in v.members or v.members[name].process != process


def kill_agent(run: Run, r: Round) -> None:
    """SIGKILL a random agent: the kubelet restarts it as a new process (new generation)."""
    pod = run.agent()
    process = run.view().members[pod.name].process
    run.driver.signal(pod, signal.SIGKILL)
    run.detected(r, _gone_or_replaced(pod.name, process))
    run.recover(r, run.replicas, lambda v: pod.name in v.members and v.members[pod.name].process != process)


def freeze_agent(run: Run, r: Round) -> None:
    """SIGSTOP a random agent until the group notices (its lease ends), then SIGCONT: it
    fences, rejoins with a new generation, and keeps its memory."""
    pod = run.agent()
    process = run.view().members[pod.name].process
    run.driver.signal(pod, signal.SIGSTOP)
    try:
        run.detected(r, lambda v: pod.name not in v.members, timeout=LEASE_TTL + 10)
    finally:
        run.driver.signal(pod, signal.SIGCONT)
        r.t_heal = run.now()
    # the same process, memory kept (the traffic reads its copies again)
    run.recover(r, run.replicas, lambda v: pod.name in v.members and v.members[pod.name].process == process)


def etcd_restart(run: Run, r: Round) -> None:
    """SIGKILL etcd; the kubelet starts it again on the same data (emptyDir). Also measured:
    the fewest agent pods ready from the fault to recovery (readiness should follow the
    ability to serve transfers, which losing etcd does not take away)."""
    pod = run.driver.pods("etcd")[0]
    run.driver.signal(pod, signal.SIGKILL)
    try:
        run.detected(r, lambda v: not v.etcd_ok, timeout=10)
        run.wait("etcd back", lambda v: v.etcd_ok, RECOVERY_DEADLINE)
        r.t_heal = run.now()
        run.recover(r, run.replicas)
    finally:
        end = run.now()
        run.wait_for("a readiness sample after recovery", lambda: run.ready_samples_after(end), 10.0)
        r.min_ready = run.min_ready(r.t_fault, end)


def partition_agent(run: Run, r: Round) -> None:
    """Cut one agent off etcd and its peers (everything but loopback) until the group notices,
    then heal the network."""
    pod = run.agent()
    run.driver.partition(pod, True)
    try:
        run.detected(r, lambda v: pod.name not in v.members, timeout=LEASE_TTL + 10)
    finally:
        run.driver.partition(pod, False)
        r.t_heal = run.now()
    run.recover(r, run.replicas, lambda v: pod.name in v.members)


def scale_up_down(run: Run, r: Round) -> None:
    """One more agent, then back, under traffic (the scale-down drains first)."""
    run.driver.scale(run.replicas + 1)
    run.detected(r, lambda v: len(v.members) == run.replicas + 1, timeout=RECOVERY_DEADLINE)
    run.wait("scaled up", lambda v: healthy(v, run.replicas + 1), RECOVERY_DEADLINE)
    run.driver.scale(run.replicas)
    r.t_heal = run.now()
    run.recover(r, run.replicas)


def kill_operator(run: Run, r: Round) -> None:
    """SIGKILL the operator replica that works, and scale the group up at once: the other
    replica takes over and reconciles the change. Failover (and detection): SIGKILL to the
    TransferGroup's status showing the new generation reconciled, which only the replica that
    took over can have written. The kubelet restarts the killed one, which waits behind the
    one that took over (the next kill-operator round waits for it). Then back to the usual
    size."""
    ops = run.wait_for(  # the killed one of the last round may sit in the kubelet's back-off
        "every operator replica running", lambda: _all_running(run.driver.pods("operator")), BACKOFF_LIMIT
    )
    active = run.wait_for("the working operator replica", run.driver.active_operator, 30)
    op = next(p for p in ops if p.name == active)
    log.info("round %d: operator replicas %s, %s works", r.round, [p.name for p in ops], active)
    watch = run.driver.watch_group("{.status.observedGeneration}")
    try:
        run.wait_for("a watch on the group's status", lambda: watch.seen, 30)
        run.driver.signal(op, signal.SIGKILL)
        killed, r.t_fault = time.monotonic(), run.now()
        run.driver.scale(run.replicas + 1)
        generation = run.driver.group_generation()
        reconciled = run.wait_for(
            "the other replica to reconcile the change",
            lambda: watch.first(lambda v: v.isdigit() and int(v) >= generation),
            RECOVERY_DEADLINE,
            interval=0.05,
        )
    finally:
        watch.close()
    try:
        r.failover_s = r.detection_s = round(reconciled - killed, 2)
        run.recover(r, run.replicas + 1)
    finally:
        run.save_logs("operator", r)
    run.driver.scale(run.replicas)
    r.t_heal = run.now()
    run.wait("scaled back", lambda v: healthy(v, run.replicas), RECOVERY_DEADLINE)


def _all_running(pods: list[Pod]) -> list[Pod] | None:
    return pods if len(pods) >= 2 and all(p.ready and p.container for p in pods) else None


def gpu_less(run: Run, r: Round) -> None:
    """Every member is GPU-less: both roles are still planned (prefill and decode on host
    memory and TCP); lose a prefill member and they still are."""
    view = run.view()
    with_gpu = [m.name for m in view.members.values() if m.gpus]
    if with_gpu:
        r.violations.append(f"members with GPUs in a GPU-less run: {with_gpu}")
    roles = set(view.plan.roles.values()) if view.plan else set()
    if roles != {"prefill", "decode"}:
        r.violations.append(f"a GPU-less group planned roles {sorted(roles)}, not prefill and decode")
    prefill = sorted(n for n, role in (view.plan.roles.items() if view.plan else []) if role == "prefill")
    pod = run.agent(prefill[0] if prefill else None)
    process = view.members[pod.name].process
    run.driver.signal(pod, signal.SIGKILL)
    run.detected(r, _gone_or_replaced(pod.name, process))
    both = lambda v: v.plan is not None and set(v.plan.roles.values()) == {"prefill", "decode"}  # noqa: E731
    run.recover(r, run.replicas, both)


def set_engine_load(pod: Pod, waiting: int) -> None:
    """The stand-in engine's queue (what the sidecar reads from its metrics)."""
    body = json.dumps({"waiting": waiting, "running": min(waiting, 4)}).encode()
    url = f"http://{pod.ip}:{ENGINE_PORT}/load"
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as answer:
        answer.read()


def _prefill_count(v: View) -> int:
    return sum(1 for role in (v.plan.roles.values() if v.plan else ()) if role == "prefill")


def _addressed(pods: list[Pod], replicas: int) -> dict[str, Pod] | None:
    """The pods by name when there are `replicas` and each has its address, else None."""
    return {p.name: p for p in pods} if len(pods) == replicas and all(p.ip for p in pods) else None


def engine_load(run: Run, r: Round) -> None:
    """Engine pods under load while the traffic flows: overloaded prefill engines make the
    leader flip a decode member to prefill (settle time + a plan); then every engine
    overloaded makes the autoscaler add a pod through /scale; load gone, it drains one and
    scales back in."""
    view = run.view()
    before = _prefill_count(view)
    # every engine is driven, so every pod needs its address (one the last round replaced may
    # still be starting even though the group is whole again)
    pods = run.wait_for(
        "every agent pod with an address",
        lambda: _addressed(run.driver.pods("agent"), run.replicas),
        RECOVERY_DEADLINE,
    )
    for name, role in view.plan.roles.items() if view.plan else ():
        set_engine_load(pods[name], 30 if role == "prefill" else 0)
    run.detected(r, lambda v: _prefill_count(v) > before, timeout=SETTLE_FLIPS + 60)
    group, ns = run.driver.group, run.driver.namespace
    patch = json.dumps({"spec": {"autoscaling": AUTOSCALING}})
    run.driver.kubectl("patch", "transfergroup", group, "-n", ns, "--type=merge", "-p", patch)
    try:
        for pod in pods.values():
            set_engine_load(pod, 20)
        run.wait("scaled out by load", lambda v: len(v.members) > run.replicas, RECOVERY_DEADLINE)
        for pod in run.driver.pods("agent"):
            if pod.ip:
                set_engine_load(pod, 0)
        r.t_heal = run.now()
        run.recover(r, run.replicas)  # scaled back in, the leaving member drained first
    finally:
        off = json.dumps({"spec": {"autoscaling": None}})
        run.driver.kubectl("patch", "transfergroup", group, "-n", ns, "--type=merge", "-p", off, check=False)
        for pod in run.driver.pods("agent"):
            if pod.ip:
                with contextlib.suppress(OSError):
                    set_engine_load(pod, 0)


SCENARIOS: dict[str, Callable[[Run, Round], None]] = {
    "kill-agent": kill_agent,
    "freeze-agent": freeze_agent,
    "etcd-restart": etcd_restart,
    "partition-agent": partition_agent,
    "scale-up-down": scale_up_down,
    "kill-operator": kill_operator,
    "gpu-less": gpu_less,
    "engine-load": engine_load,
}


def round_order(rng: random.Random, names: list[str], rounds: int) -> list[str]:
    """The scenarios of `rounds` rounds (at least one of each): shuffled decks of every name,
    one after another, so each runs at most once per deck and no fault piles up (the kubelet
    backs off a container it restarts often, 10 s, 20 s, 40 s, ..., and resets only after
    10 min of running)."""
    order: list[str] = []
    while len(order) < max(rounds, len(names)):
        order += rng.sample(names, len(names))
    return order[: max(rounds, len(names))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m e2e.scenarios", description=__doc__.splitlines()[0])
    ap.add_argument("--driver", choices=["local", "kind"], default="local")
    ap.add_argument("--rounds", type=int, default=20, help="rounds (at least one of each scenario)")
    ap.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("e2e/out"), help="report.json and timeline.png go here")
    ap.add_argument("--keep", action="store_true", help="leave the cluster up")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    driver: Driver
    if args.driver == "local":
        from e2e.local import LocalDriver

        driver = LocalDriver(args.out / "cluster", replicas=args.replicas)
    else:
        from e2e.kind import KindDriver

        driver = KindDriver(workdir=args.out / "kind", replicas=args.replicas)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # tear the cluster down on the way out
    log.info("seed %d, %d rounds, driver %s", seed, args.rounds, args.driver)
    run = Run(driver, rounds=args.rounds, seed=seed, out=args.out)
    try:
        result = run.run()
    finally:
        if not args.keep:
            driver.down()
    (args.out / "report.json").write_text(json.dumps(result, indent=1))
    report.write_png(result, args.out / "timeline.png")
    print(report.format_summary(report.summary(result)))
    print(report.format_control_plane(report.control_plane(result)))
    failed = [r for r in result["rounds"] if not r["ok"]]
    bad = {k: v["violations"] for k, v in result["invariants"].items() if v["violations"]}
    print(f"{len(result['rounds'])} rounds, {len(failed)} failed; blocks {result['blocks']}; seed {seed}")
    for k, v in bad.items():
        print(f"invariant {k}: {v[:5]}")
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
