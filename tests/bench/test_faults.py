"""The fault matrix (`podpulse bench faults`) on its cheap faults, through the same code path: every
poison kind mixed into valid traffic, and valid events produced again at new offsets, on Tansu + DuckDB.

Every figure is read back from the topic, the store and the dead-letter topic, so this fails when the
pipeline loses, duplicates or fails to dead-letter anything (or when the bench stops measuring).
"""

from bench.faults import KEYS, POISON_COPIES, POISON_KINDS, run
from testbed.servers import Servers

EVENTS = 2_000


def test_poison_kinds_and_resent_events_lose_and_duplicate_nothing(ray_local, tansu):
    rows = run(events=EVENTS, only=["poison", "resend"], servers=Servers(tansu=tansu))
    assert [r["fault"] for r in rows] == [f"poison/{kind}" for kind in POISON_KINDS] + ["resend"]
    for r in rows:
        assert tuple(r) == KEYS
        assert (r["store"], r["broker"]) == ("duckdb", "tansu")
        assert r["lost"] == 0 and r["duplicated"] == 0, r
        assert r["dead_lettered"] == r["expected_dead_letters"], r
        assert r["produced"] == r["stored"] == EVENTS, r  # measured: what the topic and the store hold
        assert r["recovery_s"] is None  # nothing injected at a point in time
    assert all(r["expected_dead_letters"] == POISON_COPIES for r in rows[:-1])
    assert rows[-1]["expected_dead_letters"] == 0
    assert "re-sent" in rows[-1]["note"]
