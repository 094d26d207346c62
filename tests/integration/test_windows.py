"""Windowed aggregation against the real broker: for every window type, the results on
the sink topic equal a recomputation (a fold written here, independently of
``operators.windows``) of the input records; late records reach the late topic; the
last windows of a quiet stream are closed by the idle timer; bad records reach the
dead-letter topic.
"""

from __future__ import annotations

import random
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.kafka_io import partition_for
from tests.support import Worker, produce_json, read_topic, run, unique

PARTITIONS = 4
BASE = 1_700_000_000  # event time origin, seconds
AGGS = [{"name": "n", "type": "count"}, {"name": "total", "type": "sum", "field": "value"}]

#: name -> window spec; the fold below mirrors each one.
WINDOWS = {
    "tumb": {"type": "tumbling", "size": 10, "grace": 5},
    "hop": {"type": "hopping", "size": 30, "step": 10, "grace": 5},
    "slide": {"type": "sliding", "max_difference": 5, "grace": 5},
    "sess": {"type": "session", "gap": 5, "grace": 20},
    "cnt": {"type": "count", "size": 3},
}


def window_config(names=tuple(WINDOWS), idle_close: float = 3, extra: list | None = None) -> dict:
    entries = [
        {"name": n, "source": "events", "key_by": "user_id", "time_field": "ts",
         "window": WINDOWS[n], "aggregations": AGGS, "emit": "final", "idle_close": idle_close}
        for n in names
    ]
    return {"windows": entries + (extra or [])}


def write_config(config: dict) -> str:
    path = Path(tempfile.mkdtemp(prefix="streametl-win-")) / "pipelines.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def make_records(n: int, keys: int, seed: int, late: int = 0) -> list[dict]:
    """In-order-ish events (disorder below every grace) then ``late`` records far
    behind the stream, all keyed by user_id."""
    rng = random.Random(seed)
    out, t = [], 0.0
    for i in range(n):
        t += rng.random() * 1.5
        out.append({"event_id": i, "user_id": f"u{rng.randrange(keys)}",
                    "ts": round(BASE + max(0.0, t - rng.random() * 3), 3), "value": rng.randint(1, 20)})
    for j in range(late):
        out.append({"event_id": n + j, "user_id": f"u{j % keys}", "ts": round(BASE + t - 80, 3),
                    "value": 1000})
    return out


# --- the fold: an independent recomputation of what each window type must emit --------

def _arrivals(records: list[dict]):
    """(record, ts ms, stream time ms of its partition after it) in processing order:
    records are produced keyed by user_id, so each partition sees its keys in order."""
    st: dict[int, int] = defaultdict(int)
    for r in records:
        p = partition_for(r["user_id"].encode(), PARTITIONS, 0)
        ts = round(r["ts"] * 1000)
        st[p] = max(st[p], ts)
        yield r, ts, st[p]


def fold(kind: str, records: list[dict]) -> tuple[dict, list]:
    """{(key, start, end): (count, total)} every window must end with, and the late
    records as (key, event_id)."""
    spec = {k: (v * 1000 if k != "type" and kind != "cnt" else v) for k, v in WINDOWS[kind].items()}
    acc: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    late: list[tuple] = []
    if kind in ("tumbling", "hopping", "tumb", "hop"):
        size, step, grace = spec["size"], spec.get("step", spec["size"]), spec["grace"]
        for r, ts, st in _arrivals(records):
            missed = False
            for s in range(ts - ts % step, ts - size, -step):
                if s + size + grace <= st:
                    missed = True
                    continue
                acc[(r["user_id"], s, s + size)][0] += 1
                acc[(r["user_id"], s, s + size)][1] += r["value"]
            if missed:
                late.append((r["user_id"], r["event_id"]))
    elif kind == "slide":
        d, grace = spec["max_difference"], spec["grace"]
        kept = defaultdict(list)
        for r, ts, st in _arrivals(records):
            if ts + grace < st:  # its own window [ts - d, ts] includes its end
                late.append((r["user_id"], r["event_id"]))
            else:
                kept[r["user_id"]].append((ts, r["value"]))
        for key, items in kept.items():
            for e in {ts for ts, _ in items}:
                inside = [v for ts, v in items if e - d <= ts <= e]
                acc[(key, e - d, e)] = [len(inside), sum(inside)]
    elif kind == "sess":
        gap, grace = spec["gap"], spec["grace"]
        kept = defaultdict(list)
        for r, ts, st in _arrivals(records):
            if ts + grace < st:
                late.append((r["user_id"], r["event_id"]))
            else:
                kept[r["user_id"]].append((ts, r["value"]))
        for key, items in kept.items():
            items.sort()
            cur = None
            for ts, v in items:
                if cur is not None and ts - cur[1] <= gap:
                    cur = [cur[0], ts, cur[2] + 1, cur[3] + v]
                else:
                    if cur:
                        acc[(key, cur[0], cur[1])] = cur[2:]
                    cur = [ts, ts, 1, v]
            acc[(key, cur[0], cur[1])] = cur[2:]
    elif kind == "cnt":
        size = spec["size"]
        seq: dict[str, int] = defaultdict(int)
        for r, _ts, _st in _arrivals(records):
            i = seq[r["user_id"]]
            seq[r["user_id"]] += 1
            s = i - i % size
            acc[(r["user_id"], s, s + size)][0] += 1
            acc[(r["user_id"], s, s + size)][1] += r["value"]
    return {k: tuple(v) for k, v in acc.items()}, late


def emitted(records: list[Any]) -> dict:
    """{(key, start, end): (count, total)} from a sink; a window emitted twice (at-least-
    once after a crash) must have been emitted with the same value."""
    out: dict[tuple, tuple] = {}
    for rec in records:
        r = rec.json()
        assert r["final"] is True
        k = (r["key"], r["start"], r["end"])
        v = (r["count"], r["aggregates"]["total"])
        assert r["aggregates"]["n"] == r["count"]
        if k in out:
            assert out[k] == v, f"window {k} emitted twice with different values"
        out[k] = v
    return out


def read_results(prefix: str, name: str, expect: int, timeout: float = 120.0) -> list[Any]:
    return run(read_topic(f"{prefix}{name}.aggregates", expect=expect, timeout=timeout, idle=timeout))


# --- tests -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def worker(kafka):
    name = unique("win")
    upd = {"name": "upd", "source": "events", "key_by": "user_id", "time_field": "ts",
           "window": WINDOWS["tumb"], "aggregations": AGGS, "emit": "update"}
    w = Worker(app_id=name, topic_prefix=f"{name}.",
               env={"STREAMETL_PIPELINES_FILE": write_config(window_config(extra=[upd]))})
    w.start(timeout=150)
    records = make_records(400, keys=7, seed=11, late=5)
    run(produce_json(f"{name}.events", records, key="user_id",
                     raw=[b"not json", b'{"ts": 1, "value": 1}', b'{"user_id": "u1", "ts": 1, "value": "x"}']))
    yield w, records
    w.kill()


@pytest.mark.parametrize("name", list(WINDOWS))
def test_emitted_windows_equal_the_fold_for_every_window_type(worker, name):
    w, records = worker
    want, _ = fold(name, records)
    got = emitted(read_results(w.topic_prefix, name, expect=len(want)))
    assert got == want


@pytest.mark.parametrize("name", ["tumb", "hop", "slide", "sess"])
def test_windows_the_stream_time_passed_are_closed_by_event_time(worker, name):
    """A window whose close time its partition's stream time reached is closed by event
    time, not left for the idle timer (which a stream that never pauses never reaches)."""
    w, records = worker
    want, _ = fold(name, records)
    spec = {k: v * 1000 for k, v in WINDOWS[name].items() if k != "type"}
    # A session closes after its gap; a window that includes its end, after that end.
    after_end = {"sess": spec.get("gap", 0) + 1, "slide": 1}.get(name, 0)
    stream_time: dict[int, int] = {}  # each partition's last stream time
    for r, _ts, st in _arrivals(records):
        p = partition_for(r["user_id"].encode(), PARTITIONS, 0)
        stream_time[p] = max(stream_time.get(p, 0), st)
    closed_by = {(r["key"], r["start"], r["end"]): r["closed_by"]
                 for r in (rec.json() for rec in read_results(w.topic_prefix, name, expect=len(want)))}
    by_event_time = {k for k in want
                     if k[2] + after_end + spec["grace"] <= stream_time[partition_for(k[0].encode(), PARTITIONS, 0)]}
    assert len(by_event_time) > len(want) // 2
    assert {k for k in by_event_time if closed_by.get(k) != "event_time"} == set()


def test_the_last_windows_of_a_quiet_stream_are_closed_by_the_idle_timer(worker):
    w, records = worker
    want, _ = fold("tumb", records)
    results = [r.json() for r in read_results(w.topic_prefix, "tumb", expect=len(want))]
    idle = [r for r in results if r["closed_by"] == "idle"]
    assert idle, "no window was closed by the idle timer"
    last_end = max(r["end"] for r in results)
    assert any(r["end"] == last_end for r in idle)
    assert {r["source"] for r in results} == {"events"} and {r["window"] for r in results} == {"tumb"}


@pytest.mark.parametrize("name", ["tumb", "hop", "slide", "sess"])
def test_late_records_past_the_grace_go_to_the_late_topic(worker, name):
    w, records = worker
    _, want_late = fold(name, records)
    assert len(want_late) >= 5
    got = run(read_topic(f"{w.topic_prefix}{name}.late", expect=len(want_late), timeout=90))
    got_late = {(r.json()["key"], r.json()["ts"]) for r in got}
    by_id = {r["event_id"]: r for r in records}
    assert got_late == {(k, round(by_id[i]["ts"] * 1000)) for k, i in want_late}
    assert all(r.headers["late.reason"] == b"past_grace" for r in got)


def test_emit_update_writes_every_change_and_the_last_equals_the_fold(worker):
    w, records = worker
    want, _ = fold("tumb", records)
    n_updates = sum(c for c, _ in want.values())
    got = run(read_topic(f"{w.topic_prefix}upd.aggregates", expect=n_updates, timeout=120))
    assert len(got) >= n_updates
    last = {}
    for rec in got:
        r = rec.json()
        assert r["final"] is False
        last[(r["key"], r["start"], r["end"])] = (r["count"], r["aggregates"]["total"])
    assert last == want


def test_bad_records_reach_the_dead_letter_topic_with_the_reason(worker):
    w, _ = worker
    got = run(read_topic(f"{w.topic_prefix}dlq", timeout=60, idle=5))
    mine = [r for r in got if r.headers.get("dlq.pipeline") == b"tumb"]
    assert sorted(r.headers["dlq.reason"] for r in mine) == [b"invalid_json", b"missing_key", b"not_numeric"]
    assert {r.value for r in mine} == {b"not json", b'{"ts": 1, "value": 1}', b'{"user_id": "u1", "ts": 1, "value": "x"}'}


def test_a_pipeline_window_step_aggregates_the_pipelines_output(kafka):
    """``{op: window}`` as a pipeline's last step: the pipeline's records (here filtered)
    are aggregated, and the results on the pipeline's sink equal the fold of what the
    pipeline let through."""
    name = unique("pwin")
    config = {"pipelines": [{
        "name": "clicks", "source": "events", "sink": "clicks.per_user",
        "steps": ["normalize", {"op": "filter", "where": "value > 5"},
                  {"op": "window", "key_by": "user_id", "time_field": "ts", "window": WINDOWS["tumb"],
                   "aggregations": AGGS, "emit": "final", "idle_close": 3}],
    }]}
    w = Worker(app_id=name, topic_prefix=f"{name}.", env={"STREAMETL_PIPELINES_FILE": write_config(config)})
    w.start(timeout=150)
    try:
        records = make_records(200, keys=5, seed=5)
        run(produce_json(f"{name}.events", records, key="user_id"))
        want, _ = fold("tumb", [r for r in records if r["value"] > 5])
        got = emitted(run(read_topic(f"{name}.clicks.per_user", expect=len(want), timeout=120, idle=120)))
        assert got == want
    finally:
        w.kill()
