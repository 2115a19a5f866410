"""Pieces of the chaos drivers that need no cluster: the field watch that times the
operator's failover, and reading kopf's peering records."""

from __future__ import annotations

import datetime
import sys
import time

from e2e import driver


def test_a_field_watch_times_each_value_as_it_arrives() -> None:
    script = "import time; print('1', flush=True); time.sleep(0.5); print('2', flush=True); time.sleep(30)"
    started = time.monotonic()
    watch = driver.FieldWatch([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while watch.first(lambda v: v == "2") is None:
            assert time.monotonic() < deadline, watch.seen
            time.sleep(0.02)
        one, two = watch.first(lambda v: v == "1"), watch.first(lambda v: v == "2")
        assert one is not None and two is not None
        assert started <= one < two and two - one >= 0.45
        assert watch.first(lambda v: v == "3") is None
    finally:
        watch.close()


def test_a_peering_record_is_live_within_its_lifetime_only() -> None:
    now = time.time()

    def record(age: float, lifetime: int = 3) -> dict[str, object]:
        seen = datetime.datetime.fromtimestamp(now - age, tz=datetime.UTC)
        return {"priority": 5, "lifetime": lifetime, "lastseen": seen.isoformat()}

    assert driver._seen_within(record(1.0), now)
    assert not driver._seen_within(record(3.5), now)
    assert not driver._seen_within(record(1.0, lifetime=0), now)  # a replica that left cleanly
    assert not driver._seen_within({"priority": 5}, now)
