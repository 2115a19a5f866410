"""How operator replicas elect the one that works: kopf peering with a short lifetime and a
priority that makes the oldest replica win (docs/decisions/013-operator-failover.md)."""

from __future__ import annotations

import datetime

from weft.operator import handlers


def test_the_older_replica_has_the_higher_priority() -> None:
    first = handlers.default_priority(1_800_000_000.0)
    restarted = handlers.default_priority(1_800_000_001.0)
    assert restarted < first  # a replica that (re)starts later never takes the work back


def test_replicas_started_in_the_same_second_differ_in_the_low_bits_only() -> None:
    started = 1_800_000_000.5
    seen = {handlers.default_priority(started) for _ in range(64)}
    assert len(seen) > 1  # kopf pauses every replica when two share the highest priority
    assert max(seen) - min(seen) < handlers.PRIORITY_TIEBREAK
    assert all(0 < p < 2**43 for p in seen)  # exact in JSON numbers, positive


def test_priority_keeps_falling_until_long_after_this_century() -> None:
    late = datetime.datetime(2199, 1, 1, tzinfo=datetime.UTC).timestamp()
    assert handlers.default_priority(late) > 0
    assert handlers.default_priority(late) < handlers.default_priority(late - 1)


def test_a_dead_replica_blocks_the_others_for_at_most_a_few_seconds() -> None:
    # kopf renews a record every second when its lifetime is under 6 s; a standby resumes
    # once the dead replica's record is PEERING_LIFETIME old
    assert 2 <= handlers.PEERING_LIFETIME <= 4
