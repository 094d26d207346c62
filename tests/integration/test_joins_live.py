"""The live join (agents/join.py) against the real broker: for each join type, what a
worker writes to the sink equals a fold of the inputs computed from the definition,
with out-of-order records within the grace, late ones past it (on the late topic),
duplicates, a key with many matches and unmatched keys on both sides; and a worker
restarted in the middle keeps its buffered records, so pairs whose two sides straddle
the restart are emitted (under exactly_once, after a kill -9, each exactly once as a
read_committed reader sees it).

The inputs come in phases, each produced only once the worker has committed the
previous one. A phase's times span less than the grace, so no record of it is late
whatever order the two topics are read in; the records meant to be late are older than
the grace behind an earlier phase. The last phase is one far-future record per
partition, which closes every interval (the unmatched records are then emitted)."""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.support import (
    BOOTSTRAP,
    Worker,
    committed_to_end,
    create_topics,
    kafka_options,
    read_topic,
    run,
    unique,
    wait_for,
    write_config,
)

PARTITIONS = 4
WITHIN, GRACE = 10.0, 30.0
TYPES = ("inner", "left", "outer")
EXACTLY_ONCE = {"STREAMETL_PROCESSING_GUARANTEE": "exactly_once"}


def config() -> dict:
    return {"pipelines": [
        {"name": f"j{t}", "source": "orders", "sink": f"paid.{t}",
         "steps": [{"op": "join", "with": "payments", "on": "k", "within": WITHIN, "grace": GRACE, "type": t,
                    "time_field": "ts"}]}
        for t in TYPES]}


def partition_of(record: dict) -> int:
    return record["k"] % PARTITIONS


def make_phases(seed: int, n: int) -> list[tuple[list[dict], list[dict]]]:
    """``n`` phases of (left, right) records, then the closing phase."""
    rng = random.Random(seed)
    phases, serial = [], 0
    # Recent times: the outputs carry them as record timestamps, and the broker's
    # retention would delete records of 1970 at its next check.
    start = int(time.time()) - 1200
    for j in range(n):
        base = start + 20 * j
        sides: dict[str, list[dict]] = {"l": [], "r": []}
        for side in "lr":
            keys = [k for k in range(40) if rng.random() < 0.6]
            keys += [100 + j % 4] if side == "l" else [200 + j % 4]  # one side only: unmatched
            keys += [7] * 6 if j == 1 else []  # many matches of one key
            for k in keys:
                serial += 1
                sides[side].append({"k": k, "ts": round(base + rng.uniform(0, 25), 1), "id": f"{side}{serial}"})
            sides[side] += [dict(r) for r in rng.sample(sides[side], 2)]  # duplicates
            if j >= 1:  # late: far behind the previous phase's stream time
                for k in rng.sample(range(40), 2):
                    serial += 1
                    sides[side].append({"k": k, "ts": base - 100, "id": f"{side}{serial}", "late": True})
            rng.shuffle(sides[side])  # out of order within the phase (its span < grace)
        phases.append((sides["l"], sides["r"]))
    end = start + 20 * n + 1000
    phases.append(([{"k": 1000 + p, "ts": end, "sentinel": True} for p in range(PARTITIONS)],
                   [{"k": 2000 + p, "ts": end, "sentinel": True} for p in range(PARTITIONS)]))
    return phases


def fold(join_type: str, phases: list[tuple[list[dict], list[dict]]]) -> tuple[Counter, Counter]:
    """The join by its definition: (outputs, late records) as multisets of JSON."""
    # Per partition, the largest time seen on each side; stream time is the smaller.
    side_time = {(p, s): float("-inf") for p in range(PARTITIONS) for s in "lr"}
    kept: dict[str, list[dict]] = {"l": [], "r": []}
    late = []
    for left, right in phases:
        seen = dict(side_time)
        for side, records in (("l", left), ("r", right)):
            for r in records:
                p = partition_of(r)
                if r["ts"] < min(side_time[(p, "l")], side_time[(p, "r")]) - GRACE:
                    late.append(r)
                else:
                    kept[side].append(r)
                    seen[(p, side)] = max(seen[(p, side)], r["ts"])
        for records in (left, right):
            for r in records:  # the phases are built so that no other record can be late
                p = partition_of(r)
                assert r.get("late") or r.get("sentinel") or r["ts"] >= min(seen[(p, "l")], seen[(p, "r")]) - GRACE
        side_time = seen
    assert all(r.get("late") for r in late) and late
    out, matched_l, matched_r = [], set(), set()
    for a, left_r in enumerate(kept["l"]):
        for b, right_r in enumerate(kept["r"]):
            if left_r["k"] == right_r["k"] and abs(left_r["ts"] - right_r["ts"]) <= WITHIN:
                out.append({"left": left_r, "right": right_r, "ts": max(left_r["ts"], right_r["ts"])})
                matched_l.add(a)
                matched_r.add(b)
    if join_type in ("left", "outer"):
        out += [{"left": r, "right": None, "ts": r["ts"]} for a, r in enumerate(kept["l"])
                if a not in matched_l and not r.get("sentinel")]
    if join_type == "outer":
        out += [{"left": None, "right": r, "ts": r["ts"]} for b, r in enumerate(kept["r"])
                if b not in matched_r and not r.get("sentinel")]
    return as_multiset(out), as_multiset(late)


def as_multiset(records) -> Counter:
    return Counter(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for r in records)


async def produce(prefix: str, left: list[dict], right: list[dict]) -> None:
    """Both sides keyed by the join key, in the same partition number (co-partitioned)."""
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", **kafka_options())
    await producer.start()
    try:
        futures = [await producer.send(f"{prefix}{topic}", json.dumps(r).encode(), key=str(r["k"]).encode(),
                                       partition=partition_of(r))
                   for topic, records in (("orders", left), ("payments", right)) for r in records]
        for f in futures:
            await f
    finally:
        await producer.stop()


def wait_committed(w: Worker) -> None:
    topics = [f"{w.topic_prefix}{t}" for t in ("orders", "payments")]
    run(wait_for(lambda: committed_to_end(w.app_id, topics, PARTITIONS), timeout=180, interval=1,
                 what="the worker to commit every input record"))


def assert_equals_the_fold(w: Worker, phases, isolation: str) -> None:
    for t in TYPES:
        want, want_late = fold(t, phases)

        async def complete(t=t, want=want):
            got = await read_topic(f"{w.topic_prefix}paid.{t}", timeout=30, idle=3, isolation_level=isolation)
            return got if len(got) >= sum(want.values()) else None

        try:
            got = run(wait_for(complete, timeout=180, interval=2, what=f"{t} join outputs"))
        except TimeoutError:
            got = run(read_topic(f"{w.topic_prefix}paid.{t}", timeout=60, idle=3, isolation_level=isolation))
        outputs = as_multiset(r.json() for r in got)
        missing, extra = want - outputs, outputs - want
        assert not missing and not extra, (
            f"{t}: {sum(missing.values())} missing, {sum(extra.values())} extra (of {sum(want.values())}): "
            f"{list(missing)[:3]} {list(extra)[:3]}")
        for r in got:  # keyed by the join key; the record's timestamp is the pair's time
            joined = r.json()
            assert r.key == str((joined["left"] or joined["right"])["k"]).encode()
            assert r.timestamp == round(joined["ts"] * 1000)
        late = run(read_topic(f"{w.topic_prefix}pipeline.j{t}.late", timeout=60, idle=2, isolation_level=isolation))
        assert as_multiset(orjson.loads(r.value) for r in late) == want_late, t
        assert {r.headers["late.side"] for r in late} == {b"left", b"right"}


def start(name: str, env: dict) -> Worker:
    run(create_topics([f"{name}.orders", f"{name}.payments"], partitions=PARTITIONS))
    w = Worker(app_id=name, topic_prefix=f"{name}.",
               env={**env, "STREAMETL_PIPELINES_FILE": write_config(config())})
    return w.start(timeout=150)


@pytest.mark.timeout(900)
def test_live_joins_equal_the_fold_across_a_graceful_restart(kafka):
    name = unique("join")
    phases = make_phases(seed=5, n=5)
    w = start(name, {})
    try:
        for i, (left, right) in enumerate(phases):
            if i == 3:
                # Buffered records of phases 1-2 wait for partners in phase 3.
                w.stop()
                w.start(timeout=150)
            run(produce(w.topic_prefix, left, right))
            wait_committed(w)
        assert_equals_the_fold(w, phases, "read_uncommitted")
        status, body = w.get("/api/v1/pipelines")
        counters = {p["name"]: p["counters"]["join"] for p in body["pipelines"]}
        assert counters["jinner"]["late"] > 0 and counters["jinner"]["pairs"] > 0
    finally:
        w.kill()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("wipe", [False, True], ids=["rocksdb-kept", "rocksdb-wiped"])
def test_live_joins_under_exactly_once_after_a_kill9_each_pair_once(kafka, wipe):
    """With the local state wiped, the buffers come back from the changelog."""
    name = unique("joineos")
    phases = make_phases(seed=11, n=5)
    w = start(name, EXACTLY_ONCE)
    try:
        for i, (left, right) in enumerate(phases):
            if i == 3:
                # Half of phase 3 in, then kill -9 while it is being joined: its open
                # transaction is aborted and the records are joined again after the restart.
                half_l, half_r = len(left) // 2, len(right) // 2
                run(produce(w.topic_prefix, left[:half_l], right[:half_r]))
                w.kill()
                if wipe:
                    w.wipe_state()
                w.start(timeout=150)
                wait_committed(w)
                left, right = left[half_l:], right[half_r:]
            run(produce(w.topic_prefix, left, right))
            wait_committed(w)
        assert_equals_the_fold(w, phases, "read_committed")
    finally:
        w.kill()


@pytest.mark.timeout(600)
def test_idle_sides_close_the_intervals_of_left_and_outer_joins(kafka):
    """idle_close against the real broker: with a grace long enough that no interval
    would close from the records alone, the worker's idle ticks (into each idle side's
    partitions) close them once both sides stopped: a left join emits each unmatched
    left record, an outer join the unmatched records of both sides, each once and
    besides the pair; a partner produced afterwards goes to the late topic, not out as
    a pair after its record was emitted alone."""
    name = unique("joinidle")
    cfg = {"pipelines": [
        {"name": f"j{t}", "source": "orders", "sink": f"paid.{t}",
         "steps": [{"op": "join", "with": "payments", "on": "k", "within": 10, "grace": 600, "type": t,
                    "time_field": "ts", "idle_close": 2}]}
        for t in ("left", "outer")]}
    run(create_topics([f"{name}.orders", f"{name}.payments"], partitions=PARTITIONS))
    w = Worker(app_id=name, topic_prefix=f"{name}.", env={"STREAMETL_PIPELINES_FILE": write_config(cfg)})
    w.start(timeout=150)
    t0 = 1_700_000_000.0
    left = [{"k": k, "ts": t0 + k, "id": f"l{k}"} for k in range(8)]
    right = [{"k": 0, "ts": t0 + 1, "id": "r0"}, {"k": 100, "ts": t0 + 2, "id": "r100"}]
    pair = {"left": left[0], "right": right[0], "ts": t0 + 1}
    want = {
        "left": as_multiset([pair] + [{"left": r, "right": None, "ts": r["ts"]} for r in left[1:]]),
        "outer": as_multiset([pair] + [{"left": r, "right": None, "ts": r["ts"]} for r in left[1:]]
                             + [{"left": None, "right": right[1], "ts": right[1]["ts"]}]),
    }
    try:
        run(produce(w.topic_prefix, left, right))
        for t, expected in want.items():
            async def complete(t=t, expected=expected):
                got = await read_topic(f"{w.topic_prefix}paid.{t}", timeout=10, idle=2)
                return got if len(got) >= sum(expected.values()) else None

            try:
                run(wait_for(complete, timeout=180, interval=2, what=f"{t} join outputs after idle_close"))
            except TimeoutError as exc:
                # What the worker did: the join counters (ticks marked, closes) and its log.
                _, body = w.get("/api/v1/pipelines")
                counters = {p["name"]: p["counters"]["join"] for p in body["pipelines"]}
                raise AssertionError(f"{exc}\ncounters: {counters}\n{w.log_tail(200)}") from exc
        late_partner = {"k": 3, "ts": t0 + 3, "id": "r3"}
        run(produce(w.topic_prefix, [], [late_partner]))
        wait_committed(w)
        for t, expected in want.items():
            got = run(read_topic(f"{w.topic_prefix}paid.{t}", timeout=60, idle=3))
            assert as_multiset(r.json() for r in got) == expected, t
            late = run(read_topic(f"{w.topic_prefix}pipeline.j{t}.late", timeout=60, idle=2))
            assert [orjson.loads(r.value) for r in late] == [late_partner], t
        status, body = w.get("/api/v1/pipelines")
        counters = {p["name"]: p["counters"]["join"] for p in body["pipelines"]}
        assert counters["jleft"]["idle_marked"] > 0 and counters["jleft"]["right"] == 3
    finally:
        w.kill()


@pytest.mark.timeout(600)
def test_sides_not_keyed_by_the_join_key_are_repartitioned(kafka):
    """repartition against the real broker: both topics are written with keys and
    partitions unrelated to the join key (a key's records are spread over all
    partitions, on both sides), and the join still finds every pair: each side is
    re-keyed by the join key through its internal topic
    (``pipeline.<name>.<side>.keyed``, the windows' rekey step). Without it most pairs
    would be in different partitions. A left join's unmatched records are emitted once
    both sides are idle (idle_close); nothing is late (the grace covers all times)."""
    name = unique("joinrekey")
    cfg = {"pipelines": [
        {"name": "jleft", "source": "orders", "sink": "paid.left",
         "steps": [{"op": "join", "with": "payments", "on": "k", "within": 5, "grace": 600, "type": "left",
                    "time_field": "ts", "idle_close": 2, "repartition": True}]}]}
    run(create_topics([f"{name}.orders", f"{name}.payments"], partitions=PARTITIONS))
    w = Worker(app_id=name, topic_prefix=f"{name}.", env={"STREAMETL_PIPELINES_FILE": write_config(cfg)})
    w.start(timeout=150)
    rng = random.Random(3)
    t0 = 1_700_000_000.0
    left = [{"k": rng.randrange(12), "ts": t0 + i, "id": f"l{i}"} for i in range(120)]
    right = [{"k": rng.randrange(12), "ts": t0 + i + rng.uniform(0, 3), "id": f"r{i}"} for i in range(120)]
    want, matched = [], set()
    for a in left:
        for b in right:
            if a["k"] == b["k"] and abs(a["ts"] - b["ts"]) <= 5:
                want.append({"left": a, "right": b, "ts": max(a["ts"], b["ts"])})
                matched.add(a["id"])
    want += [{"left": a, "right": None, "ts": a["ts"]} for a in left if a["id"] not in matched]

    async def produce_scattered() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", **kafka_options())
        await producer.start()
        try:
            for topic, records in (("orders", left), ("payments", right)):
                for i, r in enumerate(records):
                    await producer.send_and_wait(f"{name}.{topic}", json.dumps(r).encode(), key=f"x{i}".encode(),
                                                 partition=i % PARTITIONS)
        finally:
            await producer.stop()

    try:
        run(produce_scattered())

        async def complete():
            got = await read_topic(f"{name}.paid.left", timeout=10, idle=2)
            return got if len(got) >= len(want) else None

        run(wait_for(complete, timeout=240, interval=2, what="the re-keyed join's outputs"))
        # Read again to catch anything past the expected count (idle=3). Its own bound
        # is generous: under CI load a 10 s bound once returned nothing at all.
        got = run(read_topic(f"{name}.paid.left", timeout=60, idle=3))
        assert as_multiset(r.json() for r in got) == as_multiset(want)
        assert all(r.key == str((r.json()["left"] or r.json()["right"])["k"]).encode() for r in got)
        keyed = run(read_topic(f"{name}.pipeline.jleft.left.keyed", timeout=60, idle=2))
        assert {r.key for r in keyed if r.value} == {str(k).encode() for k in {a["k"] for a in left}}
    finally:
        w.kill()
