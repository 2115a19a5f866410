"""Member loss to a new plan acked by every survivor, with 16 and 64 agents.

Lightweight agents (membership + planning coordinator, no data path) run in one process
against a real etcd started here. For each trial one member (the leader on odd trials, so the
election is in the path too) stops without leaving: its lease expires, every survivor removes
it (detection), the leader re-plans (roles 1:3, 64 experts x 2 placed), and every survivor
applies and acks. Reported: from the first survivor's removal to the last survivor's ack of
the new epoch (target: <= 500 ms after detection), and the detection itself.

    .venv/bin/python bench/plans.py [--sizes 16,64] [--trials 5] [--ttl 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from weft.api.settings import EtcdSettings, GroupRef
from weft.engine.coordinator import Coordinator, PlanningConfig
from weft.membership.events import EventKind
from weft.membership.member import MemberConfig, Membership, MembershipEvent
from weft.planner import ExpertSpec, RatioPolicy
from weft.testing.etcd import EtcdServer

SECRET = secrets.token_bytes(32)


async def trial_group(
    settings: EtcdSettings, n: int, trials: int, ttl: float, tag: str
) -> list[dict[str, float]]:
    ref = GroupRef(group=f"bench-{tag}")
    config = PlanningConfig(RatioPolicy(1, 3), ExpertSpec(64, replication=2), debounce=0.05)
    members: dict[str, tuple[Membership, Coordinator]] = {}
    removed_at: dict[tuple[str, str], float] = {}

    def watcher(observer: str) -> object:
        def on(ev: MembershipEvent) -> None:
            if ev.kind is EventKind.REMOVED:
                removed_at.setdefault((observer, ev.name), time.monotonic())

        return on

    async def join(name: str) -> None:
        m = Membership(settings, MemberConfig(name, ref, SECRET, lease_ttl=ttl, connect_peers=False), None)
        c = Coordinator(m, config)
        m.subscribe(watcher(name))  # type: ignore[arg-type]
        members[name] = (m, c)
        await m.start()
        await m.activate()
        await c.start()

    async def all_acked(epoch_above: int, names: set[str], timeout: float) -> float:
        observer = next(iter(members.values()))[0]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            plan = observer.plan
            if (
                plan is not None
                and plan.epoch > epoch_above
                and set(plan.members) == names
                and all(observer.acks.get(x) == plan.epoch for x in names)
            ):
                return time.monotonic()
            await asyncio.sleep(0.002)
        raise TimeoutError(f"no plan acked by all {len(names)} survivors in {timeout} s")

    results = []
    try:
        await asyncio.gather(*(join(f"m{i:03d}") for i in range(n)))
        await all_acked(0, set(members), 30)
        for t in range(trials):
            await asyncio.sleep(0.5)
            observer = next(iter(members.values()))[0]
            epoch = observer.plan.epoch if observer.plan else 0
            leader = observer.leader
            victim = (
                leader
                if (t % 2 and leader)
                else sorted(n for n in members if n != leader)[t % (len(members) - 1)]
            )
            for key in [k for k in removed_at if k[1] == victim]:
                del removed_at[key]  # from an earlier trial with the same name
            m, c = members.pop(victim)
            await c.stop()
            t_stop = time.monotonic()
            await m.close()  # no delete: the lease decides, as after SIGKILL without a data path
            survivors = set(members)
            t_acked = await all_acked(epoch, survivors, ttl + 15)
            seen = [removed_at[(s, victim)] for s in survivors if (s, victim) in removed_at]
            first_removal = min(seen)
            results.append(
                {
                    "victim_was_leader": float(victim == leader),
                    "detection_s": first_removal - t_stop,
                    "acked_after_detection_s": t_acked - first_removal,
                }
            )
            await join(victim)  # back to n for the next trial
            await all_acked(epoch + 1, set(members), ttl + 15)
    finally:
        for m, c in members.values():
            await c.stop()
            await m.close()
    return results


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    report: dict[str, object] = {"ttl": args.ttl, "trials": args.trials, "sizes": {}}
    with (
        tempfile.TemporaryDirectory(prefix="weft-bench-plans-") as tmp,
        EtcdServer(Path(tmp) / "etcd") as etcd,
    ):
        settings = EtcdSettings(endpoints=[etcd.endpoint])
        for n in args.sizes:
            rows = await trial_group(settings, n, args.trials, args.ttl, str(n))
            after = sorted(r["acked_after_detection_s"] * 1000 for r in rows)
            report["sizes"][str(n)] = {  # type: ignore[index]
                "trials": rows,
                "acked_after_detection_ms_p50": statistics.median(after),
                "acked_after_detection_ms_max": max(after),
                "detection_ms_p50": statistics.median(r["detection_s"] * 1000 for r in rows),
            }
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16,64", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--ttl", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=Path("bench/out/plans.json"))
    args = ap.parse_args()
    report = asyncio.run(main_async(args))
    print("| agents | trials | detection p50 (ms) | all acked after detection p50 / max (ms) | <= 500 ms |")
    print("|---|---|---|---|---|")
    for n, r in report["sizes"].items():  # type: ignore[attr-defined]
        ok = r["acked_after_detection_ms_max"] <= 500
        print(
            f"| {n} | {len(r['trials'])} | {r['detection_ms_p50']:.0f} "
            f"| {r['acked_after_detection_ms_p50']:.0f} / {r['acked_after_detection_ms_max']:.0f} "
            f"| {'PASS' if ok else 'FAIL'} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
