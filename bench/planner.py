"""Planner compute time over group sizes, and replicas moved per leave against the minimum.

The planner is pure Python run by the group leader on every (debounced) change; the
target is <= 50 ms for 256 experts on 1024 members. A leave's minimum movement is the
replicas the leaver hosted (each must be re-created somewhere); the planner may add a bounded
rebalance on top.

    .venv/bin/python bench/planner.py [--repeat 5] [--out bench/out/planner.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from weft.planner import ExpertSpec, MemberInfo, RatioPolicy, next_plan

SIZES = [(8, 32), (64, 64), (256, 128), (1024, 256), (2048, 512)]


def _members(n: int) -> list[MemberInfo]:
    return [MemberInfo(f"m{i:05d}", gpus=1) for i in range(n)]


def _zipf_load(experts: int, rng: random.Random) -> dict[int, float]:
    ranks = list(range(experts))
    rng.shuffle(ranks)
    return {e: 1000.0 / (1 + r) ** 0.8 for e, r in zip(range(experts), ranks, strict=True)}


def measure(n: int, experts: int, repeat: int, rng: random.Random) -> dict[str, float | int]:
    policy = RatioPolicy(1, 3)
    spec = ExpertSpec(experts, replication=2, redundant_slots=experts // 4)
    load = _zipf_load(experts, rng)
    ms = _members(n)
    first_ms: list[float] = []
    replan_ms: list[float] = []
    moved: list[int] = []
    minimum: list[int] = []
    for _ in range(repeat):
        t = time.perf_counter()
        first = next_plan(None, ms, policy, spec, load).plan
        first_ms.append((time.perf_counter() - t) * 1000)
        leaver = rng.choice(ms).name
        survivors = [MemberInfo(m.name, gpus=1, role=first.roles[m.name]) for m in ms if m.name != leaver]
        t = time.perf_counter()
        change = next_plan(first, survivors, policy, spec, load)
        replan_ms.append((time.perf_counter() - t) * 1000)
        moved.append(len(change.added))
        minimum.append(sum(1 for hosts in first.experts.values() if leaver in hosts))
    return {
        "members": n,
        "experts": experts,
        "replicas": experts * 2 + experts // 4,
        "first_plan_ms_p50": statistics.median(first_ms),
        "first_plan_ms_max": max(first_ms),
        "replan_after_leave_ms_p50": statistics.median(replan_ms),
        "replan_after_leave_ms_max": max(replan_ms),
        "moved_per_leave": sum(moved),
        "minimum_per_leave": sum(minimum),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/out/planner.json"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    rows = [measure(n, e, args.repeat, rng) for n, e in SIZES]
    print(
        "| members | experts | replicas | first plan p50 / max (ms) | re-plan after a leave p50 / max (ms) "
        "| replicas moved / minimum (all leaves) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['members']} | {r['experts']} | {r['replicas']} "
            f"| {r['first_plan_ms_p50']:.1f} / {r['first_plan_ms_max']:.1f} "
            f"| {r['replan_after_leave_ms_p50']:.1f} / {r['replan_after_leave_ms_max']:.1f} "
            f"| {r['moved_per_leave']} / {r['minimum_per_leave']} |"
        )
    target = next(r for r in rows if r["members"] == 1024 and r["experts"] == 256)
    worst = max(target["first_plan_ms_max"], target["replan_after_leave_ms_max"])
    print(
        f"\n256 experts on 1024 members: worst {worst:.1f} ms (target <= 50 ms): "
        + ("PASS" if worst <= 50 else "FAIL")
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "repeat": args.repeat, "seed": args.seed}, indent=2))


if __name__ == "__main__":
    main()
