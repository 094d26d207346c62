"""The window agent's buffer discipline without a broker: with the commit-time flush,
state stays in memory across batches until the commit protocol's ``before_commit``, a
flush that fails leaves everything dirty, and results equal a fold of the input.

Runs over the in-memory store and emitter (``tables.store.MemoryStore``,
``app.commit.MemoryEmitter``), with a commit protocol of its own."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import orjson
import pytest

from agents.window_aggregate import WindowRunner
from app.codec import RecordError
from app.commit import CommitProtocol, Emitter, MemoryEmitter, TransactionalEmitter
from app.windows import decode_source, make_decoder, parse_window_def
from tables.store import MemoryStore


class Rec:
    """What a raw record of a batch-agent topic has (app/transport.py:
    RawPartitionRecords; timestamp in ms): no topic or partition, which the runner takes
    from the batch's partition. ``in_partition`` is only for this test's ``parts``."""

    __slots__ = ("in_partition", "offset", "timestamp", "key", "value", "headers")

    def __init__(self, partition, offset, value, headers=()):
        self.in_partition, self.offset = partition, offset
        self.key, self.value, self.timestamp, self.headers = None, value, 1000, headers


def parts(batch):
    """A batch as the batch agent hands it over: (partition, its records) per partition."""
    by_p = defaultdict(list)
    for rec in batch:
        by_p[rec.in_partition].append(rec)
    return list(by_p.items())


def Store(fail=False):
    store = MemoryStore()
    store.fail = fail
    return store


DEF = parse_window_def({
    "name": "t", "source": "clicks", "key_by": "user", "time_field": "ts",
    "window": {"type": "tumbling", "size": 10}, "emit": "final",
    "aggregations": [{"name": "n", "type": "count"}, {"name": "sum", "type": "sum", "field": "v"}],
    "repartition": False,
})


class Outputs(MemoryEmitter):
    """The runner's outputs as it made them: (topic, key, value[, headers]) in ``out``,
    dead letters as (partition, raw record, error) in ``refused``."""

    def __init__(self):
        super().__init__()
        self.out, self.refused = [], []

    async def send_later(self, out, sources, grouped=()):
        self.out.extend(out)

    async def dead_letter(self, key, value, **why):
        self.refused.append(why)


def runner(store, defer=True, emitter=None):
    emitter = emitter or Outputs()
    r = WindowRunner(DEF, None, None, "sink", "late", store=store, commit=CommitProtocol(emitter, defer=defer))
    r.sent = emitter.out if isinstance(emitter, Outputs) else None
    return r


def flush(r):
    return r.commit.before_commit()


def batches():
    offsets, out = defaultdict(int), []
    for b in range(6):
        batch = []
        for i in range(50):
            n = b * 50 + i
            p = n % 2
            value = orjson.dumps({"user": f"u{n % 7}", "ts": 1_000 + n * 0.5, "v": n})
            batch.append(Rec(p, offsets[p], value))
            offsets[p] += 1
        out.append(batch)
    return out


def test_state_is_written_only_by_flush_and_results_equal_a_fold():
    store = Store()
    r = runner(store)

    async def go():
        for b in batches():
            await r.process(parts(b))
            assert store.flushes == 0  # nothing written between commits
        await flush(r)

    asyncio.run(go())
    assert store.flushes == 1 and r.buffer.dirty_count == 0 and not r.meta_dirty
    assert store.str_keys  # count + sum: states written without OPT_NON_STR_KEYS
    want = defaultdict(lambda: [0, 0])
    for b in batches():
        for rec in b:
            v = orjson.loads(rec.value)
            ms = round(v["ts"] * 1000)
            want[(rec.in_partition, v["user"], ms - ms % 10_000)][0] += 1
            want[(rec.in_partition, v["user"], ms - ms % 10_000)][1] += v["n"] if "n" in v else v["v"]
    got = {}
    for _topic, _key, value in r.sent:
        res = orjson.loads(value)
        got[res["key"], res["start"]] = (res["count"], res["aggregates"]["sum"])
    # Every emitted (closed) window equals the fold of its records (keys stay in one
    # partition here: u<k> with k = n % 7 and p = n % 2 mix, so compare per key+start).
    fold = defaultdict(lambda: [0, 0])
    for (_p, user, start), (c, s) in want.items():
        fold[(user, start)][0] += c
        fold[(user, start)][1] += s
    assert got and all(tuple(fold[k]) == v for k, v in got.items())


def test_a_failed_flush_keeps_everything_dirty():
    store = Store(fail=True)
    r = runner(store)

    async def go():
        await r.process(parts(batches()[0]))
        dirty = r.buffer.dirty_count
        with pytest.raises(RuntimeError):
            await flush(r)
        assert r.buffer.dirty_count == dirty and r.meta_dirty
        store.fail = False
        await flush(r)
        assert r.buffer.dirty_count == 0 and store.flushes == 1

    asyncio.run(go())


def test_per_batch_flush_when_not_deferring():
    store = Store()
    r = runner(store, defer=False)

    async def go():
        for b in batches()[:3]:
            await r.process(parts(b))

    asyncio.run(go())
    assert store.flushes == 3 and r.buffer.dirty_count == 0


@pytest.mark.parametrize("raw", [
    b'{"user": "a", "ts": 12.5, "v": 1}', b'{"user": 7, "ts": 12, "v": 1}',
    b'{"user": "a", "ts": "2026-01-01T00:00:00+00:00", "v": 1}', b'{"user": "a", "ts": 1, "v": true}',
    b'{"user": "a", "v": 1}', b'{"ts": 1, "v": 1}', b'[1]', b'nope', None,
    b'{"user": null, "ts": 1, "v": 1}', b'{"user": "a", "ts": 1e400, "v": 1}',
])
def test_fast_decoder_equals_decode_source(raw):
    aggs = DEF.aggs
    fast = make_decoder(DEF, aggs)

    def outcome(fn):
        try:
            return fn(raw, 1.0)
        except RecordError as exc:
            return ("error", exc.reason, str(exc))

    assert outcome(fast) == outcome(lambda r, t: decode_source(DEF, aggs, r, t))


def test_results_in_flight_are_acknowledged_before_the_flush_and_a_failed_send_blocks_it():
    """Results are sent without waiting (at_least_once); ``flush`` (before every offset
    commit) first waits for every send, and a failed send fails that flush and every
    later one, so no commit can cover the lost results."""
    store = Store()
    r = runner(store, emitter=Emitter())
    order = []

    async def ok(tag):
        await asyncio.sleep(0.01)
        order.append(tag)

    async def bad():
        raise RuntimeError("broker down")

    async def go():
        r.emitter.sending.append(asyncio.ensure_future(ok("a")))
        r.emitter.sending.append(asyncio.ensure_future(ok("b")))
        r.buffer.put(b"k", {"w": []}, 0)
        await flush(r)
        assert order == ["a", "b"] and store.flushes == 1 and not r.emitter.sending
        r.emitter.sending.append(asyncio.ensure_future(bad()))
        r.buffer.put(b"k", {"w": []}, 0)
        for _ in range(2):
            with pytest.raises(RuntimeError, match="broker down"):
                await flush(r)
            assert store.flushes == 1 and r.buffer.dirty_count == 1

    asyncio.run(go())


@pytest.mark.parametrize("aggregations", [
    [{"name": "n", "type": "count"}, {"name": "sum", "type": "sum", "field": "v"}],  # states are results
    [{"name": "m", "type": "mean", "field": "v"}, {"name": "p", "type": "percentiles", "field": "v",
                                                   "percentiles": [50, 99]}],
])
@pytest.mark.parametrize("key", ["u1", 'quote"back\\slash%d%%', "ünï €", "\x01ctl"])
def test_result_json_equals_the_window_result_record(aggregations, key):
    """The results are filled-in templates (``_result_format``), not a WindowResult:
    their bytes must equal what orjson makes of ``WindowResult.to_json_dict()``, for
    every variant (final/update, each ``closed_by``, superseded) and any key text."""
    from app.models.windows import WindowResult

    defn = parse_window_def({
        "name": "t.1", "source": "cl%dicks", "key_by": "user", "time_field": "ts",
        "window": {"type": "session", "gap": 5}, "aggregations": aggregations, "repartition": False,
    })
    r = WindowRunner(defn, None, None, "sink", "late")
    w = {"s": 1_700_000_000_000, "e": 1_700_000_004_500, "n": 0, "a": r.aggs.init()}
    for v in (3, 4.5, -2):
        r.aggs.add(w["a"], {"n": None, "sum": v, "m": v, "p": v}, 0)
        w["n"] += 1
    for final, closed_by, superseded in [(True, "event_time", False), (True, "count", False),
                                         (True, "idle", False), (False, None, False), (False, None, True)]:
        topic, k, value = r._result(key, w, final, closed_by, superseded)
        want = WindowResult(
            source="cl%dicks", window="t.1", key=key, window_type="session", start=w["s"], end=w["e"],
            count=3, aggregates=None if superseded else r.aggs.result(w["a"]), final=final,
            closed_by=closed_by, superseded=superseded,
        ).to_json_dict()
        assert (topic, k) == ("sink", key.encode())
        assert value == orjson.dumps(want)


def test_bad_records_go_to_the_dead_letter_list_and_ticks_are_not_records():
    """Per fetch part: a record that cannot be decoded is handed to the dead-letter
    sender as the consumer's record itself with its partition (offset, partition for the headers),
    a tick is not counted as input, and the good records of the part still apply."""
    r = runner(Store())
    good = Rec(1, 5, orjson.dumps({"user": "a", "ts": 1_000, "v": 2}))
    bad = Rec(1, 6, b"not json")
    no_key = Rec(1, 7, orjson.dumps({"ts": 1_000, "v": 2}))
    tick = Rec(1, 8, b"", headers=[("streametl.tick", b"1")])

    asyncio.run(r.process([(1, [good, bad, no_key, tick])]))
    r.dead = [(why["partition"], {6: bad, 7: no_key}[why["offset"]], RecordError(why["reason"], ""))
              for why in r.emitter.refused]
    assert [(p, rec, exc.reason) for p, rec, exc in r.dead] == [(1, bad, "invalid_json"), (1, no_key, "missing_key")]
    assert r.stats["records"] == 1 and r.buffer.dirty_count == 1


def test_results_closed_by_event_time_have_the_record_json_for_any_key_text():
    """_close_due fills the result template inline (and quotes plain ASCII keys without
    orjson): the bytes must still equal WindowResult's JSON for every key."""
    from app.models.windows import WindowResult

    r = runner(Store())
    keys = ["u1", "U2x", 'q"uote', "back\\slash", "ünï", "sp ace", "12", "\x7f"]
    recs = [Rec(0, i, orjson.dumps({"user": k, "ts": 1_000 + i, "v": i})) for i, k in enumerate(keys)]
    recs.append(Rec(0, len(keys), orjson.dumps({"user": "later", "ts": 2_000, "v": 0})))  # closes them
    asyncio.run(r.process([(0, recs)]))
    got = {orjson.loads(value)["key"]: (key, value) for _topic, key, value in r.sent}
    assert sorted(got) == sorted(keys)
    for i, k in enumerate(keys):
        want = WindowResult(source="clicks", window="t", key=k, window_type="tumbling",
                            start=1_000_000, end=1_010_000, count=1, aggregates={"n": 1, "sum": i},
                            final=True, closed_by="event_time", superseded=False).to_json_dict()
        assert got[k] == (k.encode(), orjson.dumps(want))


def test_exactly_once_results_join_the_transaction_of_the_partition_they_come_from():
    """Under exactly_once each result is sent inside ``from_partition`` of the input
    partition whose records closed its window: the transaction that commits those
    records' offsets, wherever the result's key puts it (app/transport.py)."""
    from app.batches import SOURCE_PARTITION

    class Sink:
        def __init__(self):
            self.sent = []

        def get_topic_name(self):
            return "sink"

        async def send(self, key, value, headers=None):
            self.sent.append((SOURCE_PARTITION.get(), orjson.loads(value)["key"]))
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

    sink = Sink()
    r = WindowRunner(DEF, None, None, sink, sink, store=Store(),
                     commit=CommitProtocol(TransactionalEmitter(), defer=True))
    by_partition = {0: ["a", "b"], 1: ["c", "d"]}
    first = [(p, [Rec(p, i, orjson.dumps({"user": u, "ts": 1_000, "v": 1})) for i, u in enumerate(users)])
             for p, users in by_partition.items()]
    # A later record in each partition moves its stream time past the windows' end.
    closing = [(p, [Rec(p, 2, orjson.dumps({"user": users[0], "ts": 1_025, "v": 1}))])
               for p, users in by_partition.items()]
    asyncio.run(r.process(first))
    assert sink.sent == []
    asyncio.run(r.process(closing))
    assert sorted(sink.sent) == [(0, "a"), (0, "b"), (1, "c"), (1, "d")]
    assert SOURCE_PARTITION.get() is None  # nothing leaks past the sends


def test_a_worker_whose_session_lapsed_drops_its_unflushed_state_at_revocation(monkeypatch):
    """Issue 23 (docs/delivery.md, P; long chaos run, at_least_once, seed 1): a worker
    paused past its session was woken; the revocation's flush wrote the window state
    and partition bookkeeping it had cached before the pause to the changelog, after
    the new owner's newer writes: a minute of windows was never emitted (275 missing,
    58 wrong). Once the session lapsed, what is unflushed is dropped (its offsets
    were never committed), and the runner rebuilds from the store; otherwise the
    revocation flushes, as before."""
    class Guard:
        before_commit: list = []

        def __init__(self, lapsed: bool) -> None:
            self.lapsed = lapsed

        def session_lapsed(self) -> bool:
            return self.lapsed

    for lapsed in (False, True):
        store = Store()
        r = WindowRunner(DEF, None, None, "sink", "late", store=store,
                         commit=CommitProtocol(Outputs(), defer=True, guard=Guard(lapsed)))

        async def go(r=r):
            await r.process(parts(batches()[0]))
            assert r.buffer.dirty_count and r.meta_dirty
            await r.commit.partitions_moved()  # the revocation
            r.mark_stale()
            await r.process(parts(batches()[1]))  # rebuilds (no "dirty keys would be lost")

        asyncio.run(go())
        assert store.flushes == (0 if lapsed else 1)


def _by_length(key):
    return len(key) % 3


class GroupingOutputs(Outputs):
    """An emitter that takes outputs grouped by partition (``Emitter.takes_grouped``, as
    under at_least_once with the batch producer up): what the runner hands over grouped
    is kept as (topic name, partition, key, value)."""

    def __init__(self):
        super().__init__()
        self.grouped = []

    def takes_grouped(self):
        return True

    async def partitioner(self, topic_name):
        return _by_length  # any partitioner (the runner must use it), the same each time as Emitter's

    async def send_later(self, out, sources, grouped=()):
        self.out.extend(out)
        for name, groups in grouped:
            self.grouped.extend((name, p, key, value) for p, pairs in groups.items() for key, value in pairs)


class SwitchingOutputs(GroupingOutputs):
    """Grouped outputs whose sink partitioner changes when ``modulo`` does (the sink's
    partition count): a key goes to ``len(key) % modulo``."""

    def __init__(self):
        super().__init__()
        self.modulo = 3

    async def partitioner(self, topic_name):
        modulo = self.modulo
        return lambda key: len(key) % modulo


class SinkTopic:
    def get_topic_name(self):
        return "t.aggregates"


def test_closed_windows_grouped_by_partition_equal_the_items_path():
    """The latency fix (docs/performance.md, "window result latency"): with an emitter
    that takes outputs grouped by partition, the final results of windows closed by
    event time are grouped as they are made, each under the partition the emitter's
    partitioner gives its key, and handed to ``send_later`` as ``grouped``. The results
    are the same bytes as through the items path (``out``), in the same order within
    each partition, and no result is both grouped and an item."""
    items = WindowRunner(DEF, None, None, SinkTopic(), "late", store=Store(),
                         commit=CommitProtocol(Outputs(), defer=True))
    grouping = WindowRunner(DEF, None, None, SinkTopic(), "late", store=Store(),
                            commit=CommitProtocol(GroupingOutputs(), defer=True))

    async def go():
        for b in batches():
            await items.process(parts(b))
            await grouping.process(parts(b))

    asyncio.run(go())
    via_items = [(key, value) for _topic, key, value in items.commit.emitter.out]
    got = grouping.commit.emitter.grouped
    assert via_items and all(name == "t.aggregates" and p == len(key) % 3 for name, p, key, _ in got)
    for partition in range(3):
        assert ([(key, value) for _name, p, key, value in got if p == partition]
                == [(key, value) for key, value in via_items if len(key) % 3 == partition])
    assert len(got) == len(via_items)
    assert not grouping.commit.emitter.out  # nothing else was emitted: no late records here
    assert grouping.stats["emitted"] == items.stats["emitted"] == len(via_items)


def test_a_changed_sink_partitioner_is_used_for_keys_seen_before():
    """The close remembers each key's sink partition and JSON (``_key_outputs``: a key's
    windows close at every window end). When the emitter's partitioner changes (the
    sink's partition count), results of keys seen before go where the new one puts
    them, not where the memo said."""

    emitter = SwitchingOutputs()
    r = WindowRunner(DEF, None, None, SinkTopic(), "late", store=Store(),
                     commit=CommitProtocol(emitter, defer=True))
    first, rest = batches()[:3], batches()[3:]

    async def go():
        for b in first:
            await r.process(parts(b))
        seen = len(emitter.grouped)
        emitter.modulo = 2
        for b in rest:
            await r.process(parts(b))
        return seen

    seen = asyncio.run(go())
    assert 0 < seen < len(emitter.grouped)
    assert all(p == len(key) % 3 for _n, p, key, _v in emitter.grouped[:seen])
    assert all(p == len(key) % 2 for _n, p, key, _v in emitter.grouped[seen:])
    assert {key for _n, _p, key, _v in emitter.grouped[:seen]} & {key for _n, _p, key, _v in emitter.grouped[seen:]}


def live_batches(seed, n_batches=120, keys=12):
    """A live stream in small batches over 2 partitions: event time moves ~0.4 s a
    batch across many 10 s windows, with records out of order within a window, records
    for an older open window, and late records past every window."""
    import random

    rng = random.Random(seed)
    offsets, out, t = defaultdict(int), [], 1_000.0
    for _ in range(n_batches):
        batch = []
        for _ in range(rng.randint(1, 8)):
            t += rng.uniform(0, 0.25)
            ts = t - rng.choice((0, 0, 0, 0.3, 4.0, 25.0))
            user = f"u{rng.randrange(keys)}"
            p = int(user[1:]) % 2
            batch.append(Rec(p, offsets[p], orjson.dumps({"user": user, "ts": ts, "v": rng.randint(1, 9)})))
            offsets[p] += 1
        out.append(batch)
    return out


@pytest.mark.parametrize("interleaved", [False, True], ids=["after", "interleaved"])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "items"])
@pytest.mark.parametrize("lead_ms", [800, 1_500])
@pytest.mark.parametrize("seed", range(4))
def test_results_made_ahead_of_the_window_end_equal_results_made_at_it(seed, lead_ms, grouped, interleaved):
    """Results made ahead in the idle time before a window end (``_prerender``) are the
    bytes the close would make, in the same order, for every key a record changed after
    they were made too (each such record drops the key's result made ahead), through a
    revocation in the middle, and the flushed state is the same. ``interleaved``: the
    task makes 2 keys per turn of the loop and gets one turn between batches, so
    batches (and the revocation) come while it is half-way."""
    emitter_type = GroupingOutputs if grouped else Outputs
    sink = SinkTopic()

    def make(ahead):
        r = WindowRunner(DEF, None, None, sink, "late", store=Store(),
                         commit=CommitProtocol(emitter_type(), defer=True))
        r.PRERENDER_LEAD_MS = lead_ms
        r.PRERENDER_MAX_BATCH = 1_000 if ahead else -1
        if interleaved:
            r.PRERENDER_CHUNK = 2
        return r

    plain, ahead = make(False), make(True)

    async def go():
        for i, b in enumerate(live_batches(seed)):
            for r in (plain, ahead):
                if i == 60:
                    await flush(r)
                    r.mark_stale()  # a revocation and assignment of the same partitions
                await r.process(parts(b))
                if interleaved:
                    await asyncio.sleep(0)
                elif r.prerendering is not None:
                    await r.prerendering
        for r in (plain, ahead):
            await flush(r)

    asyncio.run(go())
    for what in ("out", "grouped"):
        assert getattr(plain.commit.emitter, what, None) == getattr(ahead.commit.emitter, what, None)
    assert plain.commit.emitter.out or getattr(plain.commit.emitter, "grouped", None)
    assert sorted(plain.store.scan()) == sorted(ahead.store.scan())
    assert plain.stats["emitted"] == ahead.stats["emitted"]
    assert "made_ahead" not in plain.stats
    assert 0 < ahead.stats["made_ahead"] < ahead.stats["emitted"]


def test_a_result_made_ahead_is_not_used_for_a_state_evicted_and_loaded_again():
    """The close takes a result made ahead only for the very state it was made from: a
    state evicted from the cache and loaded again is another object (its result is made
    at the close, from what was loaded)."""
    r = WindowRunner(DEF, None, None, SinkTopic(), "late", store=Store(),
                     commit=CommitProtocol(GroupingOutputs(), defer=True))
    r.PRERENDER_LEAD_MS = 10_000

    def rec(p, offset, user, ts):
        return Rec(p, offset, orjson.dumps({"user": user, "ts": ts, "v": 1}))

    async def go():
        await r.process(parts([rec(0, 0, "a", 1_001.0)]))
        await r.process(parts([rec(0, 1, "b", 1_002.0)]))
        if r.prerendering is not None:
            await r.prerendering
        assert set(r._ready) == {b"a", b"b"}
        await flush(r)
        state = r.buffer.cached.pop(b"a")  # evicted: the store has it
        state["w"][0]["n"] = 99  # what the old object says no longer counts
        await r.process(parts([rec(0, 2, "c", 1_011.0)]))  # closes [1000 s, 1010 s)

    asyncio.run(go())
    counts = {key: orjson.loads(value)["count"] for _n, _p, key, value in r.commit.emitter.grouped}
    assert counts == {b"a": 1, b"b": 1}
    assert r.stats["made_ahead"] == 1


def test_results_made_ahead_go_where_the_sink_partitioner_puts_them_at_the_close():
    """A result made ahead carries its key's sink partition (found when it was made);
    when the sink's partitioner changed before the close, the close places it anew."""

    def rec(offset, user, ts):
        return Rec(0, offset, orjson.dumps({"user": user, "ts": ts, "v": 1}))

    async def go(switch: bool) -> list:
        emitter = SwitchingOutputs()
        r = WindowRunner(DEF, None, None, SinkTopic(), "late", store=Store(),
                         commit=CommitProtocol(emitter, defer=True))
        r.PRERENDER_LEAD_MS = 10_000
        users = ["a", "bb", "ccc", "dddd"]
        for i, user in enumerate(users):  # window [1000 s, 1010 s)
            await r.process(parts([rec(i, user, 1_001.0 + i)]))
        for i, user in enumerate(users):  # closes it; window [1010 s, 1020 s)
            await r.process(parts([rec(10 + i, user, 1_011.0 + i)]))
        if r.prerendering is not None:
            await r.prerendering
        assert r._ready and all(made[3] >= 0 for made in r._ready.values())
        if switch:
            emitter.modulo = 2
        r.RELEASE_DELAY = 0
        await r.process(parts([rec(20, "e", 1_021.0)]))  # closes [1010 s, 1020 s)
        assert r.stats["made_ahead"] == 4
        # The closed windows are freed after the close, not in it.
        assert len(r._closed) == 4 and r.releasing is not None
        await r.releasing
        assert r._closed == [] and r.releasing is None
        return [(p, key) for _n, p, key, value in emitter.grouped if orjson.loads(value)["start"] == 1_010_000]

    assert sorted(asyncio.run(go(False))) == sorted((len(k) % 3, k) for k in (b"a", b"bb", b"ccc", b"dddd"))
    assert sorted(asyncio.run(go(True))) == sorted((len(k) % 2, k) for k in (b"a", b"bb", b"ccc", b"dddd"))


def test_the_windows_closes_took_are_freed_even_when_each_loop_ends_before_the_release():
    """The release task sleeps before freeing what closes took (``_closed``); a loop
    that ends first (``asyncio.run`` per call, as tests and tools do) cancels it: what
    it held is freed then, and the next loop's close starts a task of its own (found
    by a review: 84 lists were kept)."""
    r = WindowRunner(DEF, None, None, SinkTopic(), "late", store=Store(),
                     commit=CommitProtocol(GroupingOutputs(), defer=True))
    r.PRERENDER_LEAD_MS = 10_000
    users = ["a", "bb", "ccc", "dddd"]
    offset = 0
    for end in range(1, 30):
        async def one(end=end):
            nonlocal offset
            for i, user in enumerate(users):
                await r.process(parts([Rec(0, offset, orjson.dumps({"user": user, "ts": end * 10 + 1.0 + i, "v": 1}))]))
                offset += 1
            if r.prerendering is not None:
                await r.prerendering
        asyncio.run(one())
    assert r.stats["made_ahead"] > 50
    assert len(r._closed) < 10, f"{len(r._closed)} closed window lists kept"


@pytest.mark.parametrize("window", [
    {"type": "tumbling", "size": 10, "grace": 2},
    {"type": "hopping", "size": 10, "step": 5, "grace": 2},
    {"type": "sliding", "max_difference": 5, "grace": 2},
    {"type": "sliding", "max_difference": 5},
    {"type": "session", "gap": 5, "grace": 2},
])
def test_every_window_closes_by_event_time_in_a_stream_that_never_pauses(window):
    """Each window whose close time the stream time passed is emitted, closed by event
    time, with the fold's count: no window waits for the idle timer (which a stream
    that never pauses does not reach) and none stays in the state. Sliding and session
    windows once never entered the close index, so only an idle tick closed them."""
    import random

    defn = parse_window_def({
        "name": "t", "source": "clicks", "key_by": "user", "time_field": "ts", "window": window,
        "emit": "final", "aggregations": [{"name": "n", "type": "count"}], "repartition": False,
    })
    outputs = Outputs()
    r = WindowRunner(defn, None, None, "sink", "late", store=Store(), commit=CommitProtocol(outputs, defer=True))
    rng = random.Random(5)
    times: dict[str, list[int]] = defaultdict(list)
    t = 1_000_000
    for offset in range(600):
        t += rng.randrange(0, 3_000)
        user = f"u{rng.randrange(3)}"
        times[user].append(t)
        asyncio.run(r.process([(0, [Rec(0, offset, orjson.dumps({"user": user, "ts": t / 1000}))])]))
    stream_time = t
    want = {}
    for user, ts in times.items():
        if window["type"] in ("tumbling", "hopping"):
            size, step = window["size"] * 1000, window.get("step", window["size"]) * 1000
            starts = {s for x in ts for s in range(x - x % step, x - size, -step)}
            spans = {(s, s + size): s + size for s in starts}
        elif window["type"] == "sliding":
            d = window["max_difference"] * 1000
            spans = {(e - d, e): e + 1 for e in ts}  # its end is in it: closes after
        else:
            gap, sessions = window["gap"] * 1000, []
            for x in ts:
                if sessions and x - sessions[-1][1] <= gap:
                    sessions[-1][1] = x
                else:
                    sessions.append([x, x])
            spans = {(s, e): e + gap + 1 for s, e in sessions}
        inclusive = window["type"] in ("sliding", "session")  # tumbling, hopping: [s, e)
        for (s, e), closes in spans.items():
            if closes + window.get("grace", 0) * 1000 <= stream_time:
                want[user, s, e] = sum(1 for x in ts if s <= x and (x <= e if inclusive else x < e))
    got = {}
    for _topic, _key, value in outputs.out:
        res = orjson.loads(value)
        assert res["final"] and res["closed_by"] == "event_time"
        got[res["key"], res["start"], res["end"]] = res["count"]
    assert len(want) > 100 and got == want


def test_an_idle_tick_closes_windows_the_store_lacks_and_the_index_missed():
    """The idle close looks at every state of the partition, not only the index: the
    cached ones too, which the store lacks until the next commit's flush. A tick read
    before the first flush once closed nothing, and the partition counted as closed."""
    r = runner(Store())
    recs = [Rec(0, i, orjson.dumps({"user": f"u{i % 3}", "ts": 1_000 + i, "v": i})) for i in range(6)]
    asyncio.run(r.process([(0, recs)]))
    assert r.store.flushes == 0 and not r.sent
    r.open.clear(), r.due.clear(), r.due_times.clear()  # an index that missed the keys
    r.last_activity[0] = 0.0  # idle long ago
    asyncio.run(r.process([(0, [Rec(0, 6, b"", headers=[("streametl.tick", b"1")])])]))
    got = sorted((res["key"], res["count"], res["closed_by"]) for res in (orjson.loads(v) for _t, _k, v in r.sent))
    assert got == [("u0", 2, "idle"), ("u1", 2, "idle"), ("u2", 2, "idle")]


def test_a_partition_that_comes_back_is_idle_only_from_its_return():
    """Idleness is timed from the partition's return after a rebalance: another worker
    may have had its input meanwhile, so a tick read at once closes nothing."""
    import time

    defn = parse_window_def({"name": "t", "source": "clicks", "key_by": "user", "time_field": "ts",
                             "window": {"type": "tumbling", "size": 10}, "emit": "final",
                             "aggregations": [{"name": "n", "type": "count"}], "repartition": False,
                             "idle_close": 30})
    outputs = Outputs()
    r = WindowRunner(defn, None, None, "sink", "late", store=Store(), commit=CommitProtocol(outputs, defer=True))
    asyncio.run(r.process([(0, [Rec(0, 0, orjson.dumps({"user": "a", "ts": 1_000}))])]))
    asyncio.run(flush(r))
    r.last_activity[0] = time.monotonic() - 3_600  # idle for an hour, as this worker saw it
    r.idle_closed.add(0)
    r.last_tick[0] = time.monotonic()
    r.mark_stale()  # the partition went to another worker and came back
    assert not r.idle_closed and not r.last_tick and not r.last_activity
    asyncio.run(r.process([(0, [Rec(0, 1, b"", headers=[("streametl.tick", b"1")])])]))
    assert outputs.out == [] and r.stats["idle_closed"] == 0


def test_a_commit_writes_the_bookkeeping_as_it_was_at_its_offsets():
    """A commit's snapshot is encoded in parts with batches between them; the
    partition's stream time it writes is the one at the offsets it commits, not one a
    later batch moved (a replay after a crash would meet a stream time ahead of it and
    take its own records for late)."""
    from tables.windows import meta_key

    store = Store()
    r = runner(store)

    async def go():
        await r.process([(0, [Rec(0, i, orjson.dumps({"user": f"u{i}", "ts": 1_000, "v": 1})) for i in range(150)])])
        rest = await r.commit.begin_commit()  # more than one part: encoded between batches
        await r.process([(0, [Rec(0, 150, orjson.dumps({"user": "u0", "ts": 1_005, "v": 1}))])])
        await rest

    asyncio.run(go())
    assert orjson.loads(store.data[0][meta_key(0)])["st"] == 1_000_000


def test_a_replayed_record_moves_the_stream_time_as_it_did_when_applied():
    """After a crash the records past the committed offset are read again; those the
    stored state already holds are skipped, but they still move the stream time, so
    the records after them are late, or not, as they were the first time."""
    from tables.windows import meta_key

    store = Store()
    grace = parse_window_def({**{"name": "t", "source": "clicks", "key_by": "user", "time_field": "ts",
                                 "emit": "final", "repartition": False},
                              "window": {"type": "tumbling", "size": 10, "grace": 10},
                              "aggregations": [{"name": "n", "type": "count"}]})
    first = WindowRunner(grace, None, None, "sink", "late", store=store, commit=CommitProtocol(Outputs(), defer=True))

    async def go():
        await first.process([(0, [Rec(0, 0, orjson.dumps({"user": "a", "ts": 100}))])])
        await first.commit.before_commit()
        await first.process([(0, [Rec(0, 1, orjson.dumps({"user": "a", "ts": 200}))])])
        await first.commit.before_commit()

    asyncio.run(go())
    # The state of "a" holds offset 1; the bookkeeping is as at the offset commit before it.
    store.data[0][meta_key(0)] = orjson.dumps({"st": 100_000, "late": 0})
    outputs = Outputs()
    again = WindowRunner(grace, None, None, "sink", "late", store=store, commit=CommitProtocol(outputs, defer=True))
    asyncio.run(again.process([(0, [Rec(0, 1, orjson.dumps({"user": "a", "ts": 200})),
                                    Rec(0, 2, orjson.dumps({"user": "b", "ts": 150}))])]))
    assert again.stats["replayed_skipped"] == 1 and again.stats["late"] == 1
    assert [topic for topic, *_ in outputs.out] == ["late"]
