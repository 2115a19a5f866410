"""What a chaos run looked like, for a person: a PNG of throughput and membership over time
with every fault marked, a per-scenario table of detection, recovery and throughput, and the
control plane's figures per round: the operator's failover (`kill-operator`: SIGKILL of the
working replica to the other one's reconcile done) and the fewest agents ready while etcd
restarts (`etcd-restart`).

The chaos suite writes its report as JSON; this re-renders it without running anything again.

    python -m e2e.report REPORT.json [-o out.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

FAILED_COLOUR, OK_COLOUR = "tab:red", "grey"
COLUMNS = (
    "scenario",
    "rounds",
    "failed",
    "detection_s_p50",
    "detection_s_max",
    "recovery_s_p50",
    "recovery_s_max",
    "throughput_ratio_p50",
    "throughput_ratio_min",
)


def write_png(report: dict[str, Any], path: Path) -> None:
    """Throughput (top) and members/ready agents (bottom) against time, each round shaded from
    fault to heal (a line when it never healed), red where the round failed."""
    import matplotlib

    matplotlib.use("Agg")  # no display: CI and headless hosts
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = report.get("rounds", [])
    timeline = report.get("timeline", {})
    t = timeline.get("t", [])
    failed = sum(1 for r in rounds if not r["ok"])

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(12, 6.5), height_ratios=(3, 2))
    top.plot(t, timeline.get("throughput_mbps", []), color="tab:blue", linewidth=1)
    top.set_ylabel("throughput (MB/s)")
    top.set_ylim(bottom=0)
    bottom.step(t, timeline.get("members", []), where="post", color="tab:purple", label="members")
    bottom.plot(t, timeline.get("ready", []), color="tab:green", linewidth=1, label="ready agents")
    bottom.set_ylabel("agents")
    bottom.set_ylim(bottom=0)
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel("time (s)")
    bottom.legend(loc="lower right", fontsize=8)

    for r in rounds:
        colour = OK_COLOUR if r["ok"] else FAILED_COLOUR
        for ax in (top, bottom):
            if r["t_heal"] is None:
                ax.axvline(r["t_fault"], color=colour, linewidth=1.2, alpha=0.7)
            else:
                ax.axvspan(r["t_fault"], r["t_heal"], color=colour, alpha=0.25, linewidth=0)
        top.text(
            r["t_fault"],
            0.98,
            r["scenario"],
            transform=top.get_xaxis_transform(),  # x in data, y in axes fraction
            rotation=90,
            fontsize=7,
            va="top",
            ha="right",
            color="darkred" if not r["ok"] else "dimgrey",
            bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1},
        )

    title = f"weft chaos ({report.get('driver', '?')}): {len(rounds)} rounds, {failed} violated"
    blocks = report.get("blocks")
    if blocks:
        title += (
            f"\nblocks written {blocks['written']}, verified {blocks['verified']},"
            f" lost {blocks['lost']}, corrupt {blocks['corrupt']}"
        )
    cp = control_plane(report)
    if cp["rounds"]:
        title += (
            f"\noperator failover p50 {_cell(cp['failover_s_p50'])} s, max {_cell(cp['failover_s_max'])} s;"
            f" fewest agents ready during etcd restarts {_cell(cp['min_ready_min'])}"
        )
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _values(rounds: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rounds if r.get(key) is not None]


def summary(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per scenario, in the order scenarios first ran: rounds, failed rounds, and the
    median and worst of detection, recovery and throughput ratio (None where no round had one).

    Returns:
        Rows keyed by `COLUMNS`.
    """
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for r in report.get("rounds", []):
        by_scenario.setdefault(r["scenario"], []).append(r)
    rows = []
    for scenario, rounds in by_scenario.items():
        detection = _values(rounds, "detection_s")
        recovery = _values(rounds, "recovery_s")
        ratio = _values(rounds, "throughput_ratio")
        rows.append(
            {
                "scenario": scenario,
                "rounds": len(rounds),
                "failed": sum(1 for r in rounds if not r["ok"]),
                "detection_s_p50": statistics.median(detection) if detection else None,
                "detection_s_max": max(detection) if detection else None,
                "recovery_s_p50": statistics.median(recovery) if recovery else None,
                "recovery_s_max": max(recovery) if recovery else None,
                "throughput_ratio_p50": statistics.median(ratio) if ratio else None,
                "throughput_ratio_min": min(ratio) if ratio else None,
            }
        )
    return rows


CONTROL_PLANE = {"kill-operator": "failover_s", "etcd-restart": "min_ready"}
"""The scenarios with a control-plane figure, and the round field that holds it."""


def control_plane(report: dict[str, Any]) -> dict[str, Any]:
    """The control plane's figures: each round's (round, scenario, value) for the scenarios of
    `CONTROL_PLANE`, the median and worst failover, and the fewest ready agents seen while
    etcd restarted (None where no round had one).

    Returns:
        ``{"rounds": [...], "failover_s_p50", "failover_s_max", "min_ready_min"}``.
    """
    rounds = [
        {
            "round": r["round"],
            "scenario": r["scenario"],
            CONTROL_PLANE[r["scenario"]]: r.get(CONTROL_PLANE[r["scenario"]]),
        }
        for r in report.get("rounds", [])
        if r["scenario"] in CONTROL_PLANE
    ]
    failover = [float(r["failover_s"]) for r in rounds if r.get("failover_s") is not None]
    ready = [int(r["min_ready"]) for r in rounds if r.get("min_ready") is not None]
    return {
        "rounds": rounds,
        "failover_s_p50": statistics.median(failover) if failover else None,
        "failover_s_max": max(failover) if failover else None,
        "min_ready_min": min(ready) if ready else None,
    }


def format_control_plane(figures: dict[str, Any]) -> str:
    """`control_plane` as text: one line per round, then the summary line."""
    lines = [
        f"round {r['round']:>3}  {r['scenario']:<14} "
        + ", ".join(f"{k} {_cell(v)}" for k, v in r.items() if k not in ("round", "scenario"))
        for r in figures["rounds"]
    ]
    p50, worst = _cell(figures["failover_s_p50"]), _cell(figures["failover_s_max"])
    lines.append(
        f"operator failover p50 {p50} s, max {worst} s;"
        f" fewest agents ready during etcd restarts: {_cell(figures['min_ready_min'])}"
    )
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def format_summary(rows: list[dict[str, Any]]) -> str:
    """`summary` rows as a plain-text table: scenario left-aligned, figures right-aligned,
    ``-`` where there is no value."""
    cells = [list(COLUMNS)] + [[_cell(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = []
    for line in cells:
        first, *rest = line
        lines.append(
            "  ".join([first.ljust(widths[0])] + [c.rjust(w) for c, w in zip(rest, widths[1:], strict=True)])
        )
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.report", description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="the chaos suite's JSON report")
    parser.add_argument("-o", "--output", type=Path, help="the PNG to write (default: REPORT with .png)")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    out = args.output or args.report.with_suffix(".png")
    write_png(report, out)
    print(format_summary(summary(report)))
    print(format_control_plane(control_plane(report)))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
