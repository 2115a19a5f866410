"""e2e.report: the per-scenario figures, the table, and that the PNG gets written."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from e2e import report, scenarios


def _round(n: int, scenario: str, t: float, ok: bool = True, **figures: float | None) -> dict[str, Any]:
    return {
        "round": n,
        "scenario": scenario,
        "t_fault": t,
        "t_heal": figures.pop("t_heal", t + 4.0),
        "detection_s": figures.get("detection_s"),
        "recovery_s": figures.get("recovery_s"),
        "throughput_ratio": figures.get("throughput_ratio"),
        "violations": [] if ok else ["lost a block"],
        "ok": ok,
    }


REPORT: dict[str, Any] = {
    "driver": "local",
    "started": 1_700_000_000.0,
    "seed": 3,
    "duration_s": 40.0,
    "rounds": [
        _round(0, "kill-agent", 2.0, detection_s=1.0, recovery_s=4.0, throughput_ratio=0.9),
        _round(1, "partition", 10.0, ok=False, detection_s=3.0, recovery_s=8.0, throughput_ratio=0.5),
        _round(2, "kill-agent", 18.0, detection_s=2.0, recovery_s=6.0, throughput_ratio=0.7),
        _round(3, "kill-agent", 26.0, detection_s=4.0, recovery_s=None, throughput_ratio=0.8),
        _round(4, "stop-etcd", 34.0, ok=False, t_heal=None),
    ],
    "timeline": {
        "t": [float(t) for t in range(40)],
        "throughput_mbps": [100.0 + t for t in range(40)],
        "members": [4] * 20 + [3] * 20,
        "ready": [4] * 19 + [3] * 21,
    },
    "blocks": {"written": 10, "verified": 9, "lost": 1, "corrupt": 0},
    "invariants": {"no-loss": {"checks": 5, "violations": ["lost a block"]}},
}


def test_summary_has_one_row_per_scenario_in_first_run_order() -> None:
    assert report.summary(REPORT) == [
        {
            "scenario": "kill-agent",
            "rounds": 3,
            "failed": 0,
            "detection_s_p50": 2.0,
            "detection_s_max": 4.0,
            "recovery_s_p50": 5.0,
            "recovery_s_max": 6.0,
            "throughput_ratio_p50": 0.8,
            "throughput_ratio_min": 0.7,
        },
        {
            "scenario": "partition",
            "rounds": 1,
            "failed": 1,
            "detection_s_p50": 3.0,
            "detection_s_max": 3.0,
            "recovery_s_p50": 8.0,
            "recovery_s_max": 8.0,
            "throughput_ratio_p50": 0.5,
            "throughput_ratio_min": 0.5,
        },
        {
            "scenario": "stop-etcd",
            "rounds": 1,
            "failed": 1,
            "detection_s_p50": None,
            "detection_s_max": None,
            "recovery_s_p50": None,
            "recovery_s_max": None,
            "throughput_ratio_p50": None,
            "throughput_ratio_min": None,
        },
    ]


def test_format_summary_aligns_columns_and_dashes_missing_values() -> None:
    lines = report.format_summary(report.summary(REPORT)).splitlines()
    assert lines[0].split() == list(report.COLUMNS)
    assert len({len(line) for line in lines}) == 1  # every line padded to the same width
    assert lines[2].split() == ["kill-agent", "3", "0", "2.00", "4.00", "5.00", "6.00", "0.80", "0.70"]
    assert lines[4].split() == ["stop-etcd", "1", "1"] + ["-"] * 6


def test_write_png_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "chaos.png"
    report.write_png(REPORT, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_renders_the_png_next_to_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    assert report.main([str(path)]) == 0
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "kill-agent" in capsys.readouterr().out


def test_round_order_runs_every_scenario_and_none_more_than_once_per_deck() -> None:
    names = sorted(scenarios.SCENARIOS)
    for seed in range(200):
        order = scenarios.round_order(random.Random(seed), names, 20)
        assert len(order) == 20 and set(order) == set(names)
        decks = [order[i : i + len(names)] for i in range(0, len(order), len(names))]
        assert all(len(set(deck)) == len(deck) for deck in decks)
        assert max(order.count(n) for n in names) <= -(-20 // len(names))
    assert scenarios.round_order(random.Random(0), names, 3) == scenarios.round_order(
        random.Random(0), names, 0
    )


CONTROL_PLANE_REPORT: dict[str, Any] = {
    **REPORT,
    "rounds": [
        {**_round(0, "kill-operator", 2.0, detection_s=3.5), "failover_s": 3.5},
        {**_round(1, "etcd-restart", 9.0), "min_ready": 4},
        {**_round(2, "kill-operator", 16.0, detection_s=4.5), "failover_s": 4.5},
        {**_round(3, "kill-operator", 24.0, ok=False), "failover_s": None},
        {**_round(4, "etcd-restart", 30.0), "min_ready": 2},
        _round(5, "kill-agent", 36.0, detection_s=1.0),
    ],
}


def test_control_plane_figures_per_round_and_their_summary() -> None:
    figures = report.control_plane(CONTROL_PLANE_REPORT)
    assert figures["rounds"] == [
        {"round": 0, "scenario": "kill-operator", "failover_s": 3.5},
        {"round": 1, "scenario": "etcd-restart", "min_ready": 4},
        {"round": 2, "scenario": "kill-operator", "failover_s": 4.5},
        {"round": 3, "scenario": "kill-operator", "failover_s": None},
        {"round": 4, "scenario": "etcd-restart", "min_ready": 2},
    ]
    assert figures["failover_s_p50"] == 4.0 and figures["failover_s_max"] == 4.5
    assert figures["min_ready_min"] == 2
    text = report.format_control_plane(figures).splitlines()
    assert text[0].split() == ["round", "0", "kill-operator", "failover_s", "3.50"]
    assert text[3].split()[-1] == "-"
    assert text[-1] == (
        "operator failover p50 4.00 s, max 4.50 s; fewest agents ready during etcd restarts: 2"
    )


def test_a_report_without_control_plane_rounds_says_so_with_dashes(tmp_path: Path) -> None:
    figures = report.control_plane(REPORT)
    assert figures == {"rounds": [], "failover_s_p50": None, "failover_s_max": None, "min_ready_min": None}
    assert report.format_control_plane(figures).endswith("etcd restarts: -")
    out = tmp_path / "cp.png"
    report.write_png(CONTROL_PLANE_REPORT, out)  # the title carries the figures
    assert out.read_bytes()[:4] == b"\x89PNG"
