"""The chaos verifier's own logic (tests/chaos/verifier.py), on hand-made inputs: the
fold of the input, each verdict, and the seeded events and schedule. A verifier that
passed a broken run (or failed a correct one) would make issue 23's findings invisible
(or invent new ones), so its judgement is tested without a broker."""

from __future__ import annotations

from tests.chaos.verifier import (
    BASE_TS,
    DEFAULT_KINDS,
    GRACE_S,
    THRESHOLD,
    Source,
    flush_events,
    fold,
    judge,
    key_partition,
    make_events,
    make_schedule,
    window_start,
)

W = BASE_TS - BASE_TS % 5000  # a window start


def ev(i: int, user: str = "u1", value: int = 1, ts: int = W) -> dict:
    return {"event_id": f"e{i}", "user_id": user, "value": value, "ts": ts}


def sources(*events: dict) -> list[Source]:
    """The events as the input topic holds them: all in partition 0, in order."""
    return [Source(0, off, e) for off, e in enumerate(events)]


def result(key: str, start: int, count: int, total: float) -> dict:
    return {"key": key, "start": start, "end": start + 5000, "count": count,
            "aggregates": {"clicks": count, "total": total}, "final": True}


def late_of(src: Source) -> dict:
    return {"key": src.event["user_id"], "ts": src.event["ts"], "src_partition": src.partition,
            "src_offset": src.offset}


# A small input: u1 has two records in window W and one in the next; e2 arrives twice
# (a producer retry); e4 is late; e3 crosses the alert threshold; the flush event the
# verifier sends once the group caught up closes every window.
FLUSH = {"event_id": "f", "user_id": "flush000", "value": 0, "ts": W + 600_000, "flush": True}
INPUT = sources(ev(1, value=2), ev(2, value=3), ev(2, value=3), ev(3, value=THRESHOLD, ts=W + 5000),
                ev(4, user="u2", value=7, ts=W - 120_000), FLUSH)
LATE = [late_of(INPUT[4])]
GOOD = {
    "sink_ids": ["e1", "e2", "e3", "e4", "f"],
    # Windows count copies (they do not deduplicate); the late record is in none.
    "results": [result("u1", W, 3, 8), result("u1", W + 5000, 1, THRESHOLD)],
    "late": LATE,
    "alert_ids": ["e3"],
    "dead_letters": 0,
}


def verdict(guarantee: str = "exactly_once", **changes) -> dict:
    got = {**GOOD, **changes}
    return judge(guarantee, INPUT, got["sink_ids"], got["results"], got["late"], got["alert_ids"],
                 got["dead_letters"], changes.get("lagging"), changes.get("crashes"))


def test_fold_counts_copies_in_windows_and_leaves_late_records_out():
    f = fold(INPUT, [(0, 4)])
    assert f.ids == {"e1", "e2", "e3", "e4", "f"}
    assert f.windows == {("u1", W): (3, 8), ("u1", W + 5000): (1, THRESHOLD)}
    assert f.alerts == {"e3": 1}
    assert f.late == 1 and f.unknown_late == []
    # Without the late topic's word, the late record is expected in its window.
    assert fold(INPUT).windows[("u2", W - 120_000)] == (1, 7)


def test_a_correct_run_passes_under_both_guarantees():
    for guarantee in ("exactly_once", "at_least_once"):
        v = verdict(guarantee)
        assert v["ok"], v["failed"]
        assert v["verdicts"]["windows"]["late_records"] == 1


def test_a_missing_id_is_lost():
    v = verdict(sink_ids=["e1", "e3", "e4", "f"])
    assert v["failed"] == ["lost"]
    assert v["verdicts"]["lost"]["sample"] == ["e2"]


def test_duplicates_fail_exactly_once_and_are_only_counted_under_at_least_once():
    ids = ["e1", "e2", "e2", "e3", "e4", "e1", "f"]
    v = verdict(sink_ids=ids)
    assert v["failed"] == ["duplicated"]
    assert v["verdicts"]["duplicated"]["extra_records"] == 2
    v = verdict("at_least_once", sink_ids=ids)
    assert v["ok"] and v["verdicts"]["duplicated"]["extra_records"] == 2


def test_a_window_never_emitted_is_missing_and_its_records_unaccounted():
    v = verdict(results=[result("u1", W + 5000, 1, THRESHOLD)])
    w = v["verdicts"]["windows"]
    assert v["failed"] == ["windows"]
    assert (w["missing"], w["records_unaccounted"]) == (1, 3)


def test_a_window_with_another_count_or_sum_is_wrong():
    for bad in (result("u1", W, 2, 5), result("u1", W, 3, 9)):
        v = verdict(results=[bad, result("u1", W + 5000, 1, THRESHOLD)])
        assert v["failed"] == ["windows"] and v["verdicts"]["windows"]["wrong"] == 1


def test_a_late_record_not_in_the_late_topic_must_be_in_a_window():
    # The late topic lost the record: the fold now expects it in u2's window.
    v = verdict(late=[])
    assert v["failed"] == ["windows"]
    assert v["verdicts"]["windows"]["missing"] == 1


def test_a_window_emitted_twice_alike_is_a_repeat_only_exactly_once_fails():
    results = GOOD["results"] + [result("u1", W, 3, 8)]
    assert verdict(results=results)["failed"] == ["windows"]
    assert verdict("at_least_once", results=results)["ok"]
    # Two different values for one window fail under both.
    results = GOOD["results"] + [result("u1", W, 2, 5)]
    assert verdict("at_least_once", results=results)["failed"] == ["windows"]
    assert verdict("at_least_once", results=results)["verdicts"]["windows"]["conflicting"] == 1


def test_windows_nobody_expects_and_late_records_of_unknown_inputs_fail():
    v = verdict(results=GOOD["results"] + [result("u9", W, 1, 1)])
    assert v["failed"] == ["windows"] and v["verdicts"]["windows"]["extra"] == 1
    v = verdict(late=LATE + [{"src_partition": 3, "src_offset": 99}])
    assert v["failed"] == ["windows"] and v["verdicts"]["windows"]["unknown_late"] == 1


def test_alerts_missing_fail_and_repeats_count_only_under_at_least_once():
    assert verdict(alert_ids=[])["failed"] == ["alerts"]
    assert verdict(alert_ids=["e3", "e3"])["failed"] == ["alerts"]
    assert verdict("at_least_once", alert_ids=["e3", "e3"])["ok"]
    assert verdict("at_least_once", alert_ids=["e3", "e1"])["failed"] == ["alerts"]


def test_dead_letters_crashes_and_lag_fail():
    assert verdict(dead_letters=2)["failed"] == ["dead_letters"]
    assert verdict(crashes=[{"worker": "w1"}])["failed"] == ["crashed"]
    lag = [{"topic": "events", "partition": 1, "committed": 10, "stable_end": 90, "behind_at_most": 80}]
    v = verdict(lagging=lag)
    assert v["failed"] == ["stuck"] and v["verdicts"]["stuck"]["lagging"] == lag


def test_events_are_seeded_unique_with_copies_and_late_ones():
    a, b = make_events(7, 3000), make_events(7, 3000)
    assert a == b and a != make_events(8, 3000)
    ids = [e["event_id"] for e in a]
    assert len(set(ids)) == 3000 and 0 < len(ids) - 3000 < 150
    assert any(e["ts"] < BASE_TS - 60_000 for e in a)  # some late ones


def test_schedules_are_seeded_chained_and_mix_kinds():
    s = make_schedule(3, 6, span=60)
    assert s == make_schedule(3, 6, span=60)
    assert len({f.kind for f in s}) == 6 and {f.kind for f in s} <= set(DEFAULT_KINDS)
    times = [f.at for f in s]
    assert times == sorted(times) and 0 < times[0] and times[-1] < 60
    assert make_schedule(3, 13, span=300, kinds=["zombie"])[12].kind == "zombie"


def test_a_stuck_group_is_stuck_not_lost_for_what_it_has_not_committed():
    """Finding 3 of issue 23: records behind a stuck partition are stuck, not lost.
    Records at or past the source's committed offset (e3, e4) and the windows and
    alerts they feed are undecided; a record below it (e2) missing is lost."""
    lag = [{"topic": "events", "partition": 0, "committed": 3, "stable_end": 6, "behind_at_most": 3}]
    v = verdict(sink_ids=["e1", "e2"], results=[result("u1", W, 3, 8)], alert_ids=[], lagging=lag)
    assert v["failed"] == ["stuck"]
    assert v["verdicts"]["stuck"]["undecided"] == {"source_records": 3, "ids_missing": 3, "windows": 1,
                                                   "alerts": 1}
    assert verdict(sink_ids=["e1", "e3"], lagging=lag)["failed"] == ["lost", "stuck"]
    # A lagging partition of the re-keyed window input leaves its keys' windows undecided.
    keyed = [{"topic": "chaos_win.keyed", "partition": key_partition("u1"), "committed": 0,
              "stable_end": 9, "behind_at_most": 9}]
    assert verdict(results=[], lagging=keyed)["failed"] == ["stuck"]


def test_flush_events_close_every_window_of_every_partition_and_count_in_no_window():
    events = make_events(5, 500)
    flush = flush_events(events)
    assert sorted(key_partition(e["user_id"]) for e in flush) == [0, 1, 2, 3]
    last_close = max(window_start(e["ts"]) for e in events) + 5000 + GRACE_S * 1000
    assert all(e["ts"] > last_close for e in flush)
    f = fold(sources(*events[:3], *flush))
    assert f.ids >= {e["event_id"] for e in flush}  # the sink must hold them
    assert not {k for k in f.windows if k[0].startswith("flush")}


def test_without_the_flush_windows_its_stream_time_has_not_closed_are_undecided():
    """A stuck group never gets the flush events: the newest windows may still be
    open, so they are not missing. A window whose end + grace its partition's stream
    time has passed must be there."""
    events = [ev(1, value=2), ev(2, value=3, ts=W + 5000 + GRACE_S * 1000)]
    lag = [{"topic": "events", "partition": 0, "committed": 2, "stable_end": 9, "behind_at_most": 7}]
    v = judge("exactly_once", sources(*events), ["e1", "e2"], [result("u1", W, 1, 2)], [], [], 0, lag)
    assert v["failed"] == ["stuck"] and v["verdicts"]["stuck"]["undecided"]["windows"] == 1
    v = judge("exactly_once", sources(*events), ["e1", "e2"], [], [], [], 0, lag)
    assert v["failed"] == ["windows", "stuck"] and v["verdicts"]["windows"]["missing"] == 1
