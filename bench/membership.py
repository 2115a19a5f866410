#!/usr/bin/env python3
"""weft membership: how fast a dead agent is dropped, and what a 200-member watch costs.

Everything runs against a real etcd (Debian's etcd-server, 3.4) started by the script through
`weft.testing.etcd.EtcdServer` on free loopback ports, and every time compared is
`time.time()` on this one host.

Detection (``kill`` and ``stop``): N real ``weft agent`` processes (default 8) in one group,
lease TTL 3 s. A trial waits until every agent sees every other one at its current
generation, sleeps a random 0..TTL (so the kill falls anywhere in the keep-alive period),
picks a victim, takes ``t_kill = time.time()`` and sends SIGKILL or SIGSTOP. Then every
survivor's ``/status`` is polled until its ``events`` hold ``removed`` for the victim at the
victim's generation; a survivor's latency is that event's ``at`` minus ``t_kill`` (taken by
the survivor itself, so the polling rate does not enter). The trial's figure is the largest
over the survivors: the moment every survivor has dropped the dead peer.

* SIGKILL: the victim's sockets close, so a survivor's open data-path connection breaks, the
  peer's listen address refuses, and the survivor removes it at once (the "second signal").
  A killed process closes its connections a moment before its listener, so a probe can still
  be accepted; the survivor then waits for the heartbeat or the lease. Then a replacement
  with the same name is started; it has to wait for the dead incarnation's lease (the name is
  taken until then).
* SIGSTOP: the paused victim's sockets stay open and its listen address still accepts, so only
  silence tells: the heartbeat (no answer to pings for a whole TTL), or the lease, which
  expires TTL after the last keep-alive etcd received (the agent sends one every TTL/3) and
  which etcd 3.4 looks for every 500 ms: TTL - TTL/3 .. TTL + 0.5 s. After removal the victim
  gets SIGCONT; it fences itself and rejoins as a new generation, or (paused for less than its
  lease) is re-added at its old one.

Join-to-visible: from the replacement's process start (from SIGCONT) and from the moment the
member wrote its key (the ``joined_at`` of the key's first version, read from etcd's history)
to the last survivor's ``added`` event.

Target: every survivor has removed the dead peer within TTL + 250 ms at p99.

Fan-out (``fanout``): 200 lightweight members (``Membership`` without a fabric agent, no
eager connect, no campaign) in one group, spread over worker processes (default 4, one
asyncio loop each). Measured: the time until all have joined and until every one sees all;
CPU of the workers and of etcd while idle (keep-alives only); then K events (a new member
joins, then leaves gracefully, alternately) written by this process, and for each the time
from the write until ALL watchers have applied it (each watcher's own event time, sent back
through a multiprocessing queue), with the CPU the workers and etcd used meanwhile.

    python bench/membership.py                      # 20 trials per signal, 8 agents, 200 members
    python bench/membership.py --quick              # 5 trials, 50 members: a smoke run (~1 min)
    python bench/membership.py --phases fanout --fanout 400 --workers 8

Writes --out (default bench/out/membership.json) and a PNG next to it (histograms of the
detection latency per signal, lines at TTL and TTL + 250 ms) when matplotlib is importable.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import http.client
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import queue
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

PHASES = ("kill", "stop", "fanout")
LOOPBACK = "127.0.0.1"
TARGET_MARGIN = 0.25  # seconds over the TTL: the bound on detection at p99
EVENT_PREFIX = "ev-"  # names of the members this process adds and removes in the fan-out
TROUBLE_KINDS = ("fenced", "rejoined", "etcd-lost", "etcd-back")

POLL = 0.05  # seconds between /status rounds
HTTP_TIMEOUT = 2.0
CONSISTENT_TIMEOUT = 30.0
DETECT_SLACK = 10.0  # detection deadline: TTL + this
STOP_GRACE = 5.0  # SIGTERM -> SIGKILL when cleaning up agents
WORKER_START_TIMEOUT = 90.0
EVENT_TIMEOUT = 30.0


class BenchError(Exception):
    """A step of the bench did not happen within its deadline, or a process it needs died."""


def _weft_importable() -> None:
    """Let the bench (and its workers) import weft from the repository without installing it."""
    if (REPO_ROOT / "weft" / "__init__.py").exists() and str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


# --------------------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 2)


def stats_ms(values: list[float], offset: float = 0.0) -> dict[str, Any]:
    """p50/p99/max/min (and count) of `values` (seconds) minus `offset`, in milliseconds."""
    shifted = [v - offset for v in values]
    return {
        "n": len(values),
        "p50_ms": ms(percentile(shifted, 50)),
        "p99_ms": ms(percentile(shifted, 99)),
        "max_ms": ms(max(shifted)) if shifted else None,
        "min_ms": ms(min(shifted)) if shifted else None,
    }


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads); None when it is gone."""
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            t = psutil.Process(pid).cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def rss_mib(pid: int) -> float | None:
    """Resident set size in MiB; None when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        return None
    return None


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float | None]:
    return {role: cpu_seconds(pid) for role, pid in pids.items()}


def cpu_delta(before: dict[str, float | None], after: dict[str, float | None]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for role, b in before.items():
        a = after.get(role)
        out[role] = round(a - b, 3) if a is not None and b is not None else None
    return out


def _load() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


# --------------------------------------------------------------------------------------
# weft agents as OS processes
# --------------------------------------------------------------------------------------
def get_status(port: int, timeout: float = HTTP_TIMEOUT) -> dict[str, Any] | None:
    """An agent's /status object, or None when it does not answer."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", "/status")
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    if response.status != 200:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the bench dies (even by SIGKILL). Linux only."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


@dataclasses.dataclass
class AgentProc:
    name: str
    proc: subprocess.Popen[bytes]
    ready_file: Path
    log_file: Path
    started: float  # time.time() just before the process was started
    http_port: int = 0
    generation: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid


class Fleet:
    """The ``weft agent`` processes of one group; `close()` ends every one ever started."""

    def __init__(
        self, endpoint: str, group: str, secret: str, ttl: float, workdir: Path, log_level: str = "INFO"
    ) -> None:
        self.endpoint = endpoint
        self.log_level = log_level
        self.group = group
        from weft.membership.keyspace import Keyspace

        self.keys = Keyspace("default", group)
        self.ttl = ttl
        self.workdir = workdir
        self.env = {**os.environ, "WEFT_SECRET": secret, "PYTHONUNBUFFERED": "1"}
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        self.agents: dict[str, AgentProc] = {}
        self._every: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str) -> AgentProc:
        ready = self.workdir / f"{name}.ready.json"
        ready.unlink(missing_ok=True)  # a SIGKILLed agent leaves its own behind
        log_file = self.workdir / f"{name}.log"
        cmd = [
            sys.executable,
            "-m",
            "weft.cli",
            "agent",
            "--etcd",
            self.endpoint,
            "--group",
            self.group,
            "--name",
            name,
            "--lease-ttl",
            f"{self.ttl:g}",
            "--ready-file",
            str(ready),
            "--http-port",
            "0",
            "--log-level",
            self.log_level,
        ]
        with log_file.open("ab") as sink:
            started = time.time()
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO_ROOT,
                start_new_session=True,  # a terminal's Ctrl-C reaches the bench, which ends them
                preexec_fn=_die_with_parent,  # noqa: PLW1509 -- no threads in this process yet
            )
        self._every.append(proc)
        agent = AgentProc(name, proc, ready, log_file, started)
        self.agents[name] = agent
        return agent

    def wait_ready(self, agent: AgentProc, timeout: float) -> None:
        """Wait for the agent's ready file (written once it is active and sees itself)."""
        deadline = time.monotonic() + timeout
        while True:
            if agent.proc.poll() is not None:
                raise BenchError(
                    f"agent {agent.name} exited with status {agent.proc.returncode}\n{self.log_tail(agent)}"
                )
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(agent.ready_file.read_text())
                if info.get("pid") == agent.pid:
                    agent.http_port = int(info["http_port"])
                    agent.generation = int(info["generation"])
                    return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"agent {agent.name} not ready after {timeout:.0f} s\n{self.log_tail(agent)}"
                )
            time.sleep(0.02)

    def log_tail(self, agent: AgentProc, lines: int = 15) -> str:
        try:
            text = agent.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"    {line}" for line in text[-lines:])

    def check_alive(self, names: list[str]) -> None:
        for n in names:
            a = self.agents[n]
            if a.proc.poll() is not None:
                raise BenchError(f"agent {n} died (status {a.proc.returncode})\n{self.log_tail(a)}")

    def close(self) -> None:
        """SIGCONT + SIGTERM every agent still running (they drain and leave), SIGKILL after a grace."""
        live = [p for p in self._every if p.poll() is None]
        for p in live:
            for sig in (signal.SIGCONT, signal.SIGTERM):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, sig)
        deadline = time.monotonic() + STOP_GRACE
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
        for p in self._every:
            if p.poll() is not None:
                continue  # reaped: its pid (and group id) may belong to someone else by now
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5.0)


def wait_consistent(fleet: Fleet, timeout: float = CONSISTENT_TIMEOUT) -> dict[str, dict[str, Any]]:
    """Wait until every agent is ready and lists exactly every agent at its current generation.

    Returns each agent's /status.
    """
    deadline = time.monotonic() + timeout
    names = sorted(fleet.agents)
    while True:
        fleet.check_alive(names)
        docs = {n: get_status(fleet.agents[n].http_port) for n in names}
        why = ""
        gens = {n: d["generation"] for n, d in docs.items() if d is not None}
        for n, d in docs.items():
            if d is None:
                why = f"{n} does not answer /status"
            elif not (d["phase"] == "joined" and d["ready"]):
                why = f"{n} is {d['phase']}, ready {d['ready']}"
            elif {m["name"]: m["generation"] for m in d["members"]} != gens:
                why = f"{n} sees {[(m['name'], m['generation']) for m in d['members']]}, not {gens}"
            if why:
                break
        if not why:
            return {n: d for n, d in docs.items() if d is not None}
        if time.monotonic() > deadline:
            raise BenchError(f"the agents did not agree within {timeout:.0f} s: {why}")
        time.sleep(POLL)


def wait_events(
    fleet: Fleet, names: list[str], match: Callable[[dict[str, Any]], bool], timeout: float, what: str
) -> dict[str, dict[str, Any]]:
    """Poll the /status of `names` until each holds an event that `match`es; the first one each."""
    deadline = time.monotonic() + timeout
    found: dict[str, dict[str, Any]] = {}
    while True:
        for n in names:
            if n in found:
                continue
            doc = get_status(fleet.agents[n].http_port)
            if doc is None:
                continue
            ev = next((e for e in doc["events"] if match(e)), None)
            if ev is not None:
                found[n] = ev
        if len(found) == len(names):
            return found
        fleet.check_alive(names)
        if time.monotonic() > deadline:
            missing = sorted(set(names) - set(found))
            raise BenchError(f"{what}: not seen by {', '.join(missing)} within {timeout:.0f} s")
        time.sleep(POLL)


def removal_signal(reason: str) -> str:
    if reason.startswith("data path lost"):
        return "data-path"
    if reason.startswith("member key deleted"):
        return "lease"
    if reason.startswith("no answer to pings"):
        return "heartbeat"
    return reason


def key_written_at(etcd: Any, key: str, secret: str) -> float:
    """When the current incarnation of `key` was created: the ``joined_at`` of its first version.

    The member stamps ``joined_at`` just before its create request goes out. Later publishes
    (``active``) stamp it again, so the version at the key's create revision is read.
    """
    from weft.api import records

    def get(*extra: str) -> dict[str, Any]:
        doc = json.loads(etcd.etcdctl("get", key, "-w", "json", *extra))
        kvs = doc.get("kvs") or []
        if not kvs:
            raise BenchError(f"{key} is not in etcd")
        return dict(kvs[0])

    first = get(f"--rev={get()['create_revision']}")
    record = records.unseal(records.MemberRecord, base64.b64decode(first["value"]), key, secret.encode())
    return float(record.joined_at)


def detection_trial(
    fleet: Fleet, sig: signal.Signals, rng: random.Random, ttl: float, etcd: Any, secret: str
) -> dict[str, Any]:
    """One kill (or pause) and the return to a full group; see the module docstring."""
    docs = wait_consistent(fleet)
    t_checked = time.time()
    leader = next(iter(docs.values()))["leader"]
    delay = rng.uniform(0.0, ttl)
    time.sleep(delay)
    victim = rng.choice(sorted(fleet.agents))
    gen = docs[victim]["generation"]
    survivors = [n for n in sorted(fleet.agents) if n != victim]
    target = fleet.agents[victim]

    t_kill = time.time()
    os.kill(target.pid, sig)
    # only events after the signal: an agent that fenced itself earlier (the previous SIGSTOP
    # victim) keeps "removed <everyone>: this agent was fenced" in its event list
    removed = wait_events(
        fleet,
        survivors,
        lambda e: (
            e["kind"] == "removed" and e["name"] == victim and e["generation"] == gen and e["at"] >= t_kill
        ),
        ttl + DETECT_SLACK,
        f"removal of {victim} (generation {gen})",
    )
    per = {n: ev["at"] - t_kill for n, ev in removed.items()}
    trial: dict[str, Any] = {
        "victim": victim,
        "victim_was_leader": victim == leader,
        "generation": gen,
        "delay_before_kill_s": round(delay, 3),
        "latency_s": max(per.values()),  # every survivor has removed it
        "first_s": min(per.values()),
        "per_survivor_s": per,
        "signals": {n: removal_signal(ev["reason"]) for n, ev in removed.items()},
    }

    if sig == signal.SIGKILL:
        with contextlib.suppress(subprocess.TimeoutExpired):
            target.proc.wait(5.0)
        fresh = fleet.spawn(victim)
        origin = fresh.started
        trial["rejoin_origin"] = "process start"
        fleet.wait_ready(fresh, ttl + 45.0)
        docs = wait_consistent(fleet)
    else:
        origin = time.time()
        os.kill(target.pid, signal.SIGCONT)
        trial["rejoin_origin"] = "SIGCONT"
        docs = wait_consistent(fleet)
        fenced = [e for e in docs[victim]["events"] if e["kind"] == "fenced" and e["generation"] == gen]
        trial["fence_reason"] = fenced[-1]["reason"] if fenced else None
    new_gen = docs[victim]["generation"]
    if new_gen == gen and sig == signal.SIGKILL:
        raise BenchError(f"the replacement of {victim} came back at the old generation {gen}")
    # A paused agent comes back as a new generation when it fenced itself (its lease ran out);
    # after a pause shorter than that, survivors that dropped it re-add it at the same one.
    added = wait_events(
        fleet,
        survivors,
        lambda e: (
            e["kind"] == "added" and e["name"] == victim and e["generation"] == new_gen and e["at"] >= t_kill
        ),
        EVENT_TIMEOUT,
        f"return of {victim} (generation {new_gen})",
    )
    t_visible = max(ev["at"] for ev in added.values())
    trial["came_back_as"] = "new generation" if new_gen != gen else "same generation"
    trial["new_generation"] = new_gen
    trial["visible_from_origin_s"] = t_visible - origin
    trial["visible_from_own_join_s"] = None
    trial["own_join_after_origin_s"] = None
    if new_gen != gen:
        t_written = key_written_at(etcd, fleet.keys.member(victim), secret)
        trial["visible_from_own_join_s"] = t_visible - t_written
        trial["own_join_after_origin_s"] = t_written - origin
    trial["survivors_fenced"] = sorted(  # should stay empty: a survivor that fenced itself is a finding
        n
        for n in survivors
        if any(e["kind"] == "fenced" and e["name"] == n and e["at"] >= t_checked for e in docs[n]["events"])
    )
    return trial


def run_detection(
    fleet: Fleet,
    sig: signal.Signals,
    trials: int,
    rng: random.Random,
    ttl: float,
    etcd: Any,
    secret: str,
    out: list[dict[str, Any]],
) -> None:
    """`trials` trials, each appended to `out` as it ends (a failure keeps the earlier ones)."""
    for i in range(trials):
        t = detection_trial(fleet, sig, rng, ttl, etcd, secret)
        out.append(t)
        kinds = Counter(t["signals"].values())
        own = (
            f"{t['visible_from_own_join_s'] * 1000:.0f} ms after it wrote its key"
            if t["visible_from_own_join_s"] is not None
            else "at its old generation"
        )
        print(
            f"  {sig.name} {i + 1:2d}/{trials}: {t['victim']} dropped by all {len(t['signals'])} in "
            f"{t['latency_s'] * 1000:7.1f} ms (first {t['first_s'] * 1000:6.1f} ms; "
            f"{', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}); back in "
            f"{t['visible_from_origin_s']:.2f} s from {t['rejoin_origin']}, " + own,
            flush=True,
        )


def _known(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def summarize_detection(trials: list[dict[str, Any]], ttl: float) -> dict[str, Any]:
    figures = [t["latency_s"] for t in trials]
    samples = [v for t in trials for v in t["per_survivor_s"].values()]
    target = ttl + TARGET_MARGIN
    p99 = percentile(figures, 99)
    return {
        "all_survivors": stats_ms(figures),
        "all_survivors_minus_ttl": stats_ms(figures, ttl),
        "first_survivor": stats_ms([t["first_s"] for t in trials]),
        "spread": stats_ms([t["latency_s"] - t["first_s"] for t in trials]),
        "per_survivor": stats_ms(samples),
        "removed_by": dict(Counter(s for t in trials for s in t["signals"].values())),
        "survivor_fences": sum(len(t.get("survivors_fenced", [])) for t in trials),
        "visible_from_origin": stats_ms([t["visible_from_origin_s"] for t in trials]),
        "visible_from_own_join": stats_ms(_known(t["visible_from_own_join_s"] for t in trials)),
        "own_join_after_origin": stats_ms(_known(t["own_join_after_origin_s"] for t in trials)),
        "came_back_as": dict(Counter(t["came_back_as"] for t in trials)),
        "target_ms": ms(target),
        "pass": p99 is not None and p99 <= target,
    }


# --------------------------------------------------------------------------------------
# fan-out: lightweight members in worker processes
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FanoutPlan:
    endpoint: str
    group: str
    secret: str
    ttl: float
    total: int  # watchers the group holds before the events
    join_timeout: float


def fanout_worker(wid: int, names: list[str], plan: FanoutPlan, go: Any, stop: Any, out: Any) -> None:
    """A worker process: `names` members in one asyncio loop; reports through `out`."""
    logging.basicConfig(level=logging.WARNING, format=f"worker {wid}: %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_fanout_worker(wid, names, plan, go, stop, out))
    except KeyboardInterrupt:
        pass
    except BaseException:
        out.put(("error", wid, traceback.format_exc()))


async def _fanout_worker(wid: int, names: list[str], plan: FanoutPlan, go: Any, stop: Any, out: Any) -> None:
    _weft_importable()
    from weft.api.settings import EtcdSettings, GroupRef
    from weft.membership.member import MemberConfig, Membership, MembershipEvent

    etcd = EtcdSettings(endpoints=[plan.endpoint])
    group = GroupRef(group=plan.group)
    pending: list[tuple[str, str, str, int, str, float]] = []
    trouble: Counter[str] = Counter()
    members: list[Membership] = []
    for name in names:
        config = MemberConfig(
            name=name,
            group=group,
            secret=plan.secret.encode(),
            lease_ttl=plan.ttl,
            campaign=False,
            connect_peers=False,
            join_timeout=plan.join_timeout,
        )
        m = Membership(etcd, config)

        def listener(ev: MembershipEvent, me: str = name) -> None:
            if ev.name.startswith(EVENT_PREFIX):
                pending.append((me, ev.kind, ev.name, ev.generation, ev.reason, ev.at))
            elif ev.kind in TROUBLE_KINDS:
                trouble[ev.kind] += 1

        m.subscribe(listener)
        members.append(m)
    out.put(("ready", wid, os.getpid()))
    loop = asyncio.get_running_loop()
    if not await loop.run_in_executor(None, go.wait, WORKER_START_TIMEOUT) or stop.is_set():
        return

    async def join(m: Membership) -> tuple[str, float | None, float | None, str | None]:
        started = None
        try:
            await m.start()
            started = time.time()
            await m.wait_for(lambda: len(m.members) >= plan.total, plan.join_timeout)
            return m.config.name, started, time.time(), None
        except Exception as exc:
            return m.config.name, started, None, f"{type(exc).__name__}: {exc}"

    try:
        joined = await asyncio.gather(*(join(m) for m in members))
        out.put(("joined", wid, joined))
        parent = os.getppid()
        while not stop.is_set() and os.getppid() == parent:
            if pending:
                batch = list(pending)
                pending.clear()
                out.put(("events", wid, batch))
            await asyncio.sleep(0.02)
        if pending:
            out.put(("events", wid, list(pending)))
    finally:
        await asyncio.gather(*(m.close() for m in members), return_exceptions=True)
        out.put(("done", wid, dict(trouble)))


class Workers:
    """The fan-out worker processes and what they report."""

    def __init__(self, plan: FanoutPlan, workers: int) -> None:
        self.ctx = mp.get_context("spawn")  # fresh interpreters: no gRPC state across a fork
        self.out: Any = self.ctx.Queue()
        self.go = self.ctx.Event()
        self.stop = self.ctx.Event()
        names = [f"m{i:04d}" for i in range(plan.total)]
        self.split = [names[w::workers] for w in range(workers)]
        self.procs = [
            self.ctx.Process(
                target=fanout_worker,
                args=(w, self.split[w], plan, self.go, self.stop, self.out),
                name=f"weft-fanout-{w}",
                daemon=True,
            )
            for w in range(workers)
        ]
        self.pids: dict[int, int] = {}
        self.joined: dict[int, list[tuple[str, float | None, float | None, str | None]]] = {}
        self.done: dict[int, dict[str, int]] = {}
        self.applied: dict[tuple[str, str, int], dict[str, float]] = {}
        self.reasons: dict[tuple[str, str, int], Counter[str]] = {}

    def start(self) -> None:
        for p in self.procs:
            p.start()

    def handle(self, msg: tuple[Any, ...]) -> None:
        kind, wid, body = msg
        if kind == "error":
            raise BenchError(f"fan-out worker {wid} failed:\n{body}")
        if kind == "ready":
            self.pids[wid] = body
        elif kind == "joined":
            self.joined[wid] = body
        elif kind == "done":
            self.done[wid] = body
        elif kind == "events":
            for member, ev_kind, name, gen, reason, at in body:
                key = (ev_kind, name, gen)
                self.applied.setdefault(key, {}).setdefault(member, at)
                self.reasons.setdefault(key, Counter())[reason] += 1

    def pump(self, timeout: float) -> None:
        """Handle whatever the workers sent, waiting up to `timeout` for the first message."""
        try:
            msg = self.out.get(timeout=timeout)
        except queue.Empty:
            return
        self.handle(msg)
        while True:
            try:
                msg = self.out.get_nowait()
            except queue.Empty:
                return
            self.handle(msg)

    def wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            dead = [p.name for p in self.procs if not p.is_alive() and p.exitcode not in (0, None)]
            if dead:
                self.pump(0.2)  # its traceback, if it sent one
                raise BenchError(f"{what}: worker(s) {', '.join(dead)} died")
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: not done within {timeout:.0f} s")
            self.pump(0.05)

    def close(self) -> None:
        self.stop.set()
        self.go.set()  # a worker still waiting for the start goes away too
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline and any(p.is_alive() for p in self.procs):
            with contextlib.suppress(BenchError):
                self.pump(0.1)
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(5.0)
        with contextlib.suppress(BenchError):
            self.pump(0.0)
        self.out.cancel_join_thread()
        self.out.close()


async def drive_events(
    workers: Workers, plan: FanoutPlan, count: int, rng: random.Random
) -> list[dict[str, Any]]:
    """`count` events written by this process: a new member joins, then it leaves; alternately."""
    from weft.api.settings import EtcdSettings, GroupRef
    from weft.membership.member import MemberConfig, Membership

    loop = asyncio.get_running_loop()

    async def all_applied(key: tuple[str, str, int], what: str) -> dict[str, float]:
        deadline = time.monotonic() + EVENT_TIMEOUT
        while len(workers.applied.get(key, {})) < plan.total:
            if time.monotonic() > deadline:
                n = len(workers.applied.get(key, {}))
                raise BenchError(f"{what}: applied by {n} of {plan.total} watchers in {EVENT_TIMEOUT:.0f} s")
            await loop.run_in_executor(None, workers.pump, 0.05)
        return workers.applied[key]

    results: list[dict[str, Any]] = []
    current: Membership | None = None
    try:
        for i in range(count):
            await asyncio.sleep(rng.uniform(0.1, 0.4))
            if current is None:
                name = f"{EVENT_PREFIX}{i // 2:03d}"
                current = Membership(
                    EtcdSettings(endpoints=[plan.endpoint]),
                    MemberConfig(
                        name=name,
                        group=GroupRef(group=plan.group),
                        secret=plan.secret.encode(),
                        lease_ttl=plan.ttl,
                        campaign=False,
                        connect_peers=False,
                    ),
                )
                before = time.time()
                await current.start()
                # the record's joined_at: taken just before the create request went out
                t_write = current.members[name].record.joined_at
                key = ("added", name, current.generation)
                applied = await all_applied(key, f"join of {name}")
                entry = {
                    "event": "join",
                    "name": name,
                    "write": "create member key",
                    "call_s": t_write - before,
                }
            else:
                name, gen = current.config.name, current.generation
                t_write = time.time()  # leave(): PUT state draining, then delete the key, revoke
                await current.leave()
                entry = {"event": "leave", "name": name, "write": "leave(): draining PUT, then delete"}
                entry["call_s"] = time.time() - t_write
                current = None
                key = ("removed", name, gen)
                applied = await all_applied(key, f"leave of {name}")
                draining = workers.applied.get(("updated", name, gen), {})
                if len(draining) == plan.total:
                    entry["draining_all_applied_s"] = max(draining.values()) - t_write
                    entry["draining_first_applied_s"] = min(draining.values()) - t_write
            lat = [at - t_write for at in applied.values()]
            entry |= {
                "all_applied_s": max(lat),
                "first_applied_s": min(lat),
                "p50_watcher_s": percentile(lat, 50),
                "per_watcher_s": sorted(lat),
                "reasons": dict(workers.reasons.get(key, {})),
            }
            results.append(entry)
            print(
                f"  event {i + 1:2d}/{count}: {entry['event']:5s} {name}: all {plan.total} applied in "
                f"{entry['all_applied_s'] * 1000:6.1f} ms (first {entry['first_applied_s'] * 1000:5.1f} ms)",
                flush=True,
            )
    finally:
        if current is not None:
            with contextlib.suppress(Exception):
                await current.close()
    return results


def run_fanout(
    endpoint: str, etcd_pid: int | None, secret: str, a: argparse.Namespace, rng: random.Random
) -> dict[str, Any]:
    plan = FanoutPlan(endpoint, "fanout", secret, a.ttl, a.fanout, join_timeout=120.0)
    workers = Workers(plan, a.workers)
    report: dict[str, Any] = {"members": a.fanout, "workers": a.workers, "events": a.events}
    try:
        workers.start()
        workers.wait(lambda: len(workers.pids) == a.workers, WORKER_START_TIMEOUT, "worker start")
        pids = {f"worker{w}": pid for w, pid in sorted(workers.pids.items())}
        if etcd_pid is not None:
            pids["etcd"] = etcd_pid
        pids["driver"] = os.getpid()
        cpu0 = cpu_snapshot(pids)
        t_go = time.time()
        workers.go.set()
        print(f"fan-out: {a.fanout} members in {a.workers} processes joining", flush=True)
        workers.wait(lambda: len(workers.joined) == a.workers, plan.join_timeout + 30.0, "join")
        cpu1 = cpu_snapshot(pids)
        rows = [r for w in sorted(workers.joined) for r in workers.joined[w]]
        failed = [r for r in rows if r[3] is not None]
        if failed:
            raise BenchError(f"{len(failed)} members did not join: {failed[:3]}")
        started = [r[1] for r in rows if r[1] is not None]
        converged = [r[2] for r in rows if r[2] is not None]
        report["join"] = {
            "all_started_s": max(started) - t_go,
            "all_converged_s": max(converged) - t_go,
            "start_p50_s": percentile([s - t_go for s in started], 50),
            "cpu_s": cpu_delta(cpu0, cpu1),
            "rss_mib_after": {role: rss_mib(pid) for role, pid in pids.items()},
        }
        print(
            f"fan-out: all {a.fanout} joined in {report['join']['all_started_s']:.2f} s, every one sees all "
            f"after {report['join']['all_converged_s']:.2f} s; idle {a.idle:g} s",
            flush=True,
        )
        idle_end = time.monotonic() + a.idle
        while time.monotonic() < idle_end:
            workers.pump(min(0.1, max(0.0, idle_end - time.monotonic())))
        cpu2 = cpu_snapshot(pids)
        report["idle"] = {"seconds": a.idle, "cpu_s": cpu_delta(cpu1, cpu2)}
        t_events = time.monotonic()
        events = asyncio.run(drive_events(workers, plan, a.events, rng))
        cpu3 = cpu_snapshot(pids)
        report["events_phase"] = {
            "seconds": round(time.monotonic() - t_events, 3),
            "cpu_s": cpu_delta(cpu2, cpu3),
            "rss_mib_after": {role: rss_mib(pid) for role, pid in pids.items()},
        }
        report["event_list"] = events
        figures = [e["all_applied_s"] for e in events]
        report["all_applied"] = stats_ms(figures)
        for kind in ("join", "leave"):
            report[f"all_applied_{kind}"] = stats_ms(
                [e["all_applied_s"] for e in events if e["event"] == kind]
            )
        report["draining_all_applied"] = stats_ms(
            [e["draining_all_applied_s"] for e in events if "draining_all_applied_s" in e]
        )
        report["spread"] = stats_ms([e["all_applied_s"] - e["first_applied_s"] for e in events])
        report["per_watcher"] = stats_ms([v for e in events for v in e["per_watcher_s"]])
        workers.stop.set()
        workers.wait(lambda: len(workers.done) == a.workers, 30.0, "worker stop")
        report["watcher_trouble"] = {
            k: sum(d.get(k, 0) for d in workers.done.values()) for k in TROUBLE_KINDS
        }
    finally:
        workers.close()
    return report


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------
def md_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        lines.append("| " + " | ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(lines)


def _f(value: float | None, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


def print_report(report: dict[str, Any]) -> None:
    ttl = report["config"]["lease_ttl_granted"]
    det = report.get("detection", {})
    if det:
        print(
            f"\nDetection: {report['config']['agents']} `weft agent` processes, lease TTL {ttl:g} s; "
            f"figure = the last survivor's removal event - t_kill (ms); target p99 <= TTL + 250 ms\n"
        )
        rows = []
        for sig, d in det.items():
            if "summary" not in d:
                continue
            s, m = d["summary"]["all_survivors"], d["summary"]["all_survivors_minus_ttl"]
            f, sp = d["summary"]["first_survivor"], d["summary"]["spread"]
            rows.append(
                [
                    sig,
                    str(s["n"]),
                    _f(s["p50_ms"]),
                    _f(s["p99_ms"]),
                    _f(s["max_ms"]),
                    _f(m["p50_ms"], "+.0f"),
                    _f(m["p99_ms"], "+.0f"),
                    _f(m["max_ms"], "+.0f"),
                    f"{_f(f['p50_ms'])} / {_f(f['p99_ms'])}",
                    f"{_f(sp['p50_ms'], '.1f')} / {_f(sp['p99_ms'], '.1f')}",
                    ", ".join(f"{k} {v}" for k, v in sorted(d["summary"]["removed_by"].items())),
                    str(d["summary"]["survivor_fences"]),
                    "PASS" if d["summary"]["pass"] else "FAIL",
                ]
            )
        head = [
            "signal",
            "trials",
            "p50",
            "p99",
            "max",
            "p50-TTL",
            "p99-TTL",
            "max-TTL",
            "first survivor p50/p99",
            "spread p50/p99",
            "removed by",
            "survivor fences",
            f"<= {ttl * 1000 + TARGET_MARGIN * 1000:.0f} ms",
        ]
        print(md_table(head, rows))
        print("\nBack in the group: until the last survivor's `added` event (ms)\n")
        rows = []
        for sig, d in det.items():
            if "summary" not in d:
                continue
            o, j = d["summary"]["visible_from_origin"], d["summary"]["visible_from_own_join"]
            origin = "process start" if sig == "SIGKILL" else "SIGCONT"
            own = "writing its member key" if sig == "SIGKILL" else "writing its new member key"
            rows.append(
                [sig, f"from {origin}", str(o["n"]), _f(o["p50_ms"]), _f(o["p99_ms"]), _f(o["max_ms"])]
            )
            rows.append(
                [
                    sig,
                    f"from {own}",
                    str(j["n"]),
                    _f(j["p50_ms"], ".1f"),
                    _f(j["p99_ms"], ".1f"),
                    _f(j["max_ms"], ".1f"),
                ]
            )
        print(md_table(["signal", "from", "n", "p50", "p99", "max"], rows))
        for sig, d in det.items():
            back = d.get("summary", {}).get("came_back_as", {})
            if back.get("same generation"):
                print(
                    f"{sig}: {back['same generation']} of {sum(back.values())} came back at their old "
                    "generation (paused for less than their lease; survivors re-added them)"
                )
    fo = report.get("fanout")
    if fo:
        print(f"\nFan-out: {fo['members']} members in one group, {fo['workers']} worker processes\n")
        j = fo["join"]
        rows = [
            ["all joined (start() returned)", f"{j['all_started_s']:.2f} s"],
            ["every member sees all", f"{j['all_converged_s']:.2f} s"],
        ]
        n = fo["members"]

        def p50_p99(key: str, label: str) -> None:
            st = fo[key]
            rows.append(
                [
                    f"{label} (n={st['n']})",
                    f"p50 {_f(st['p50_ms'], '.1f')} ms, p99 {_f(st['p99_ms'], '.1f')} ms",
                ]
            )

        p50_p99("all_applied_join", f"join: create of the key -> `added` at all {n}")
        p50_p99("draining_all_applied", f"leave: draining PUT -> `updated` at all {n}")
        p50_p99("all_applied_leave", f"leave: leave() called -> `removed` at all {n}")
        p50_p99("all_applied", f"any event -> applied at all {n}")
        p50_p99("spread", "first -> last watcher, any event")
        p50_p99("per_watcher", "each watcher, any event")
        for phase, label in (
            ("join", "join"),
            ("idle", f"idle {fo['idle']['seconds']:g} s"),
            ("events_phase", "events"),
        ):
            cpu = fo[phase]["cpu_s"]
            wsum = sum(v for k, v in cpu.items() if k.startswith("worker") and v is not None)
            extra = f" over {fo[phase]['seconds']:.1f} s" if phase == "events_phase" else ""
            rows.append(
                [
                    f"CPU during {label}{extra}",
                    f"workers {wsum:.2f} s, etcd {_f(cpu.get('etcd'), '.2f')} s, "
                    f"driver {_f(cpu.get('driver'), '.2f')} s",
                ]
            )
        rss = fo["events_phase"]["rss_mib_after"]
        wr = [v for k, v in rss.items() if k.startswith("worker") and v is not None]
        rows.append(
            [
                "RSS per worker (end)",
                f"{min(wr):.0f}..{max(wr):.0f} MiB; etcd {_f(rss.get('etcd'))} MiB" if wr else "-",
            ]
        )
        trouble = {k: v for k, v in fo.get("watcher_trouble", {}).items() if v}
        rows.append(["watcher fences / etcd-lost", json.dumps(trouble) if trouble else "none"])
        print(md_table(["fan-out", "measured"], rows))


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ttl = report["config"]["lease_ttl_granted"]
    det = report.get("detection", {})
    panels = [*det.items()]
    fo = report.get("fanout")
    n = len(panels) + (1 if fo else 0)
    if n == 0:
        return
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.5), squeeze=False)
    for ax, (sig, d) in zip(axes[0], panels, strict=False):
        figures = [t["latency_s"] * 1000 for t in d["trials"]]
        samples = [v * 1000 for t in d["trials"] for v in t["per_survivor_s"].values()]
        top = max([*samples, (ttl + TARGET_MARGIN) * 1000]) * 1.08
        bins = [top * i / 60 for i in range(61)]
        ax.hist(samples, bins=bins, alpha=0.35, color="tab:gray", label="each survivor")
        ax.hist(figures, bins=bins, alpha=0.8, color="tab:blue", label="all survivors (trial)")
        ax.axvline(ttl * 1000, color="tab:orange", linestyle="--", label=f"TTL {ttl:g} s")
        ax.axvline((ttl + TARGET_MARGIN) * 1000, color="tab:red", label="TTL + 250 ms")
        ax.set_xlabel("ms from the signal to removal")
        ax.set_ylabel("count")
        ax.set_title(f"{sig}: {len(figures)} trials, {report['config']['agents']} agents")
        ax.legend(fontsize=8)
    if fo:
        ax = axes[0][-1]
        for kind, color in (("join", "tab:green"), ("leave", "tab:purple")):
            vals = [v * 1000 for e in fo["event_list"] if e["event"] == kind for v in e["per_watcher_s"]]
            if vals:
                ax.hist(vals, bins=40, alpha=0.6, color=color, label=f"{kind}: each watcher")
        ax.set_xlabel("ms from the write to the watcher's event")
        ax.set_title(f"fan-out: {fo['members']} watchers, {fo['events']} events")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"weft membership ({report['host']['cpus']} CPUs, etcd {report['host']['etcd']}, "
        f"{report['started']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _weft_source() -> dict[str, Any]:
    """The commit of the weft sources measured, and the files under weft/ changed since."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.decode(errors="replace").rstrip("\n") if done.returncode == 0 else None

    changed = git("status", "--porcelain", "--", "weft")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted": [line[3:] for line in changed.splitlines()] if changed else [],
    }


def _etcd_version(binary: str) -> str:
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    for line in done.stdout.decode(errors="replace").splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    return "?"


@contextlib.contextmanager
def _signals_end_the_run() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every `finally` runs; the cleanup itself is not interrupted."""

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, on_term)
    # a shell without job control starts background jobs with SIGINT ignored; Ctrl-C and
    # `kill -INT` should still end the run
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="5 trials per signal, 50 fan-out members")
    ap.add_argument("--trials", type=int, help="detection trials per signal (default 20, quick 5)")
    ap.add_argument("--agents", type=int, default=8, help="weft agent processes (default 8)")
    ap.add_argument("--ttl", type=float, default=3.0, help="member lease TTL in seconds (default 3)")
    ap.add_argument("--fanout", type=int, help="members in the fan-out group (default 200, quick 50)")
    ap.add_argument("--workers", type=int, default=4, help="fan-out worker processes (default 4)")
    ap.add_argument("--events", type=int, default=20, help="fan-out join/leave events (default 20)")
    ap.add_argument("--idle", type=float, help="seconds of idle CPU measurement (default 5, quick 2)")
    ap.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}"
    )
    ap.add_argument("--seed", type=int, help="random seed (victims, delays); default: random")
    ap.add_argument(
        "--keep-logs", action="store_true", help="keep the agents' logs (their folder is printed at the end)"
    )
    ap.add_argument("--agent-log-level", default="INFO", help="the agents' --log-level (default INFO)")
    ap.add_argument(
        "--out", type=Path, default=BENCH_DIR / "out" / "membership.json", help="JSON output (PNG beside it)"
    )
    a = ap.parse_args(argv)
    a.trials = a.trials or (5 if a.quick else 20)
    a.fanout = a.fanout or (50 if a.quick else 200)
    a.idle = a.idle if a.idle is not None else (2.0 if a.quick else 5.0)
    phases = [p.strip() for p in a.phases.split(",") if p.strip()]
    for p in phases:
        if p not in PHASES:
            ap.error(f"unknown phase {p!r} (choose from {', '.join(PHASES)})")
    if a.agents < 2 or a.trials < 1 or a.fanout < 1 or a.workers < 1 or a.events < 0:
        ap.error("need --agents >= 2, --trials >= 1, --fanout >= 1, --workers >= 1, --events >= 0")
    if not 0 < a.ttl <= 60:
        ap.error("--ttl must be in (0, 60] seconds")
    a.workers = min(a.workers, a.fanout)
    seed = a.seed if a.seed is not None else secrets.randbelow(1 << 31)
    rng = random.Random(seed)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    _weft_importable()
    from weft.testing.etcd import EtcdServer, find_etcd_binary

    t0 = time.monotonic()
    report: dict[str, Any] = {
        "bench": "weft membership: failure detection and watch fan-out",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "etcd": _etcd_version(find_etcd_binary()),
            "weft": _weft_source(),
            "load_start": _load(),
        },
        "config": {
            "agents": a.agents,
            "lease_ttl": a.ttl,
            "lease_ttl_granted": float(max(1, math.ceil(a.ttl))),
            "trials": a.trials,
            "fanout": a.fanout,
            "workers": a.workers,
            "events": a.events,
            "phases": phases,
            "seed": seed,
            "target": "every survivor removed the dead peer within TTL + 250 ms at p99",
        },
    }
    secret = secrets.token_hex(24)
    workdir = Path(tempfile.mkdtemp(prefix="weft-bench-membership-"))
    etcd = EtcdServer(workdir / "etcd")
    fleet: Fleet | None = None
    failed: str | None = None
    print(
        f"{report['bench']}: phases {', '.join(phases)}; {a.agents} agents x {a.trials} trials, "
        f"TTL {a.ttl:g} s; fan-out {a.fanout} members / {a.workers} processes, {a.events} events; "
        f"seed {seed}",
        flush=True,
    )
    try:
        with _signals_end_the_run():
            etcd.start()
            if "kill" in phases or "stop" in phases:
                fleet = Fleet(etcd.endpoint, "detect", secret, a.ttl, workdir, a.agent_log_level)
                for i in range(a.agents):
                    fleet.spawn(f"agent-{i}")
                for agent in fleet.agents.values():
                    fleet.wait_ready(agent, 60.0)
                docs = wait_consistent(fleet)
                granted = next(iter(docs.values()))["lease_ttl"]
                report["config"]["lease_ttl_granted"] = float(granted)
                report["agent_rss_mib"] = {n: rss_mib(ag.pid) for n, ag in fleet.agents.items()}
                report["detection"] = {}
                for phase, sig in (("kill", signal.SIGKILL), ("stop", signal.SIGSTOP)):
                    if phase not in phases:
                        continue
                    print(f"{sig.name}: {a.trials} trials", flush=True)
                    trials: list[dict[str, Any]] = []
                    report["detection"][sig.name] = {"trials": trials}
                    run_detection(fleet, sig, a.trials, rng, float(granted), etcd, secret, trials)
                with _uninterrupted():
                    fleet.close()
                fleet = None
            if "fanout" in phases:
                report["fanout"] = run_fanout(etcd.endpoint, etcd.pid, secret, a, rng)
    except (BenchError, KeyboardInterrupt) as exc:
        failed = f"{type(exc).__name__}: {exc}"
        print(f"\nbench stopped: {failed}", file=sys.stderr)
    finally:
        with _uninterrupted():
            if fleet is not None:
                fleet.close()
            etcd.close()
            if a.keep_logs:
                print(f"agent logs kept in {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)

    ttl_granted = report["config"]["lease_ttl_granted"]
    for d in report.get("detection", {}).values():
        if d["trials"]:
            d["summary"] = summarize_detection(d["trials"], ttl_granted)
    report["host"]["load_end"] = _load()
    report["runtime_s"] = round(time.monotonic() - t0, 1)
    if failed:
        report["failed"] = failed
    print_report(report)
    src = report["host"]["weft"]
    dirty = f", with uncommitted changes to {', '.join(src['uncommitted'])}" if src["uncommitted"] else ""
    print(f"\nweft at {src['commit']}{dirty}")
    print(
        f"\nruntime {report['runtime_s']:.0f} s; load average {report['host']['load_start']} -> "
        f"{report['host']['load_end']}"
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    png = a.out.with_suffix(".png")
    try:
        plot(report, png)
    except ImportError as e:
        print(f"wrote {a.out}; no plot ({e}): pip install matplotlib")
    else:
        print(f"wrote {a.out} and {png}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
