"""Metrics and cluster status without a broker (issue 20): the scrape-time collector,
lag arithmetic, per-batch histograms, the HTTP middleware, the cluster view's expiry
and totals."""

from __future__ import annotations

from types import SimpleNamespace

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from app.cluster import live_workers, status_record, totals
from app.metrics import Metrics, Sources, partition_lag, store_size
from app.settings import Settings, SettingsError


def tp(topic: str, partition: int):
    return SimpleNamespace(topic=topic, partition=partition)


def samples(metrics: Metrics) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def labelled(found: dict[str, list], name: str) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for s in found.get(name, [])}


PIPELINES = {"clean": {"in": 10, "out": 7, "dropped": 2, "dropped_by_reason": {"filtered": 2},
                       "dead_lettered": 1, "steps": []}}


def test_lag_in_records_and_seconds():
    assert partition_lag(100, 100, 5_000, now=10.0) == (0, 0.0)
    assert partition_lag(90, 100, 5_000, now=10.0) == (10, 5.0)
    assert partition_lag(90, 100, None, now=10.0) == (10, None)  # nothing delivered yet
    assert partition_lag(None, 40, None, now=10.0) == (40, None)  # nothing processed nor committed
    assert partition_lag(5, None, None, now=10.0) == (None, None)  # no fetch yet: unknown


def test_collector_reads_counters_and_the_current_assignment_only():
    assignment = [(tp("ev", 0), 90, 100, 9_000), (tp("ev", 1), 50, 50, 8_000)]
    sources = Sources(pipelines=lambda: PIPELINES,
                      windows=lambda: {"w": {"records": 5, "emitted": 3, "late": 1}},
                      patterns=lambda: ({"records": 4, "alerts": 2}, {"fraud": 2}),
                      progress=lambda: list(assignment), now=lambda: 10.0)
    m = Metrics(sources)
    found = samples(m)
    assert labelled(found, "streametl_pipeline_records_in_total") == {(("pipeline", "clean"),): 10}
    assert labelled(found, "streametl_pipeline_records_out_total") == {(("pipeline", "clean"),): 7}
    assert labelled(found, "streametl_pipeline_records_dropped_total") == {
        (("pipeline", "clean"), ("reason", "filtered")): 2}
    assert labelled(found, "streametl_pipeline_records_dead_lettered_total") == {(("pipeline", "clean"),): 1}
    assert labelled(found, "streametl_window_results_emitted_total") == {(("window", "w"),): 3}
    assert labelled(found, "streametl_window_records_late_total") == {(("window", "w"),): 1}
    assert labelled(found, "streametl_pattern_alerts_total") == {(("pattern", "fraud"),): 2}
    assert labelled(found, "streametl_consumer_lag_records") == {
        (("partition", "0"), ("topic", "ev")): 10, (("partition", "1"), ("topic", "ev")): 0}
    assert labelled(found, "streametl_consumer_lag_seconds") == {
        (("partition", "0"), ("topic", "ev")): 1.0, (("partition", "1"), ("topic", "ev")): 0.0}

    # A rebalance took partition 0 away: its series are gone at the next scrape (faust#72).
    assignment.pop(0)
    found = samples(m)
    assert labelled(found, "streametl_consumer_lag_records") == {(("partition", "1"), ("topic", "ev")): 0}
    assert labelled(found, "streametl_consumer_assigned_partitions") == {(): 1}


def test_state_store_sizes_come_from_rocksdb_properties(tmp_path):
    """keys, SST bytes and memtable bytes of a real RocksDB (rocksdict, as Faust's
    store uses), read from its properties: no walk over the keys."""
    import rocksdict

    db = rocksdict.Rdict(str(tmp_path / "store"))
    try:
        for i in range(500):
            db[f"k{i}".encode()] = b"v" * 100
        keys, disk, memory = store_size(db)
        assert keys == 500 and memory > 500 * 100
        db.flush()
        keys, disk, memory = store_size(db)
        assert keys == 500 and disk > 0
    finally:
        db.close()


def test_state_store_series_follow_the_open_partitions():
    """One series per open store partition, labelled active or standby; a partition
    revoked in a rebalance (closed by Faust) has none at the next scrape."""
    open_now = [("pipeline-p-dedupe", 0, False, 10, 4096, 2048), ("pipeline-p-dedupe", 1, True, 7, None, 1024)]
    m = Metrics(Sources(progress=list, stores=lambda: list(open_now)))
    found = samples(m)
    assert labelled(found, "streametl_state_store_keys") == {
        (("partition", "0"), ("role", "active"), ("store", "pipeline-p-dedupe")): 10,
        (("partition", "1"), ("role", "standby"), ("store", "pipeline-p-dedupe")): 7}
    assert labelled(found, "streametl_state_store_disk_bytes") == {
        (("partition", "0"), ("role", "active"), ("store", "pipeline-p-dedupe")): 4096}
    assert len(labelled(found, "streametl_state_store_memtable_bytes")) == 2
    open_now.pop(1)
    assert set(labelled(samples(m), "streametl_state_store_keys")) == {
        (("partition", "0"), ("role", "active"), ("store", "pipeline-p-dedupe"))}


def test_event_to_output_latency_is_measured_from_the_oldest_record_timestamp():
    """Records stamped out of time order (event-time stamps from several producers):
    the latency is the age of the oldest record of the partition, not of the first by
    offset; a partition whose records carry no timestamp is not observed."""
    import time

    m = Metrics(Sources(progress=list))
    now_ms = time.time() * 1000
    stamped = [SimpleNamespace(timestamp=int(now_ms - age * 1000)) for age in (1, 50, 2)]  # floor: never younger
    batch = SimpleNamespace(parts=[(tp("ev", 0), stamped), (tp("ev", 1), [SimpleNamespace(timestamp=None)])])
    m.observe_batch("pipeline.clean", batch, 0.001)
    found = samples(m)
    assert labelled(found, "streametl_event_to_output_seconds_count") == {(("agent", "pipeline.clean"),): 1}
    assert 50 <= labelled(found, "streametl_event_to_output_seconds_sum")[(("agent", "pipeline.clean"),)] < 60


def test_registries_are_per_instance():
    a, b = Metrics(Sources(progress=list)), Metrics(Sources(progress=list))
    a.commit_seconds.observe(0.01)
    assert labelled(samples(a), "streametl_commit_seconds_count") == {(): 1}
    assert labelled(samples(b), "streametl_commit_seconds_count") == {(): 0}


def test_batch_observation_is_one_per_batch_and_partition():
    m = Metrics(Sources(progress=list))
    record = SimpleNamespace(timestamp=1_000)  # 1970: a long latency, but observed
    batch = SimpleNamespace(parts=[(tp("ev", 0), [record] * 500), (tp("ev", 1), [record] * 3)])
    m.observe_batch("pipeline.clean", batch, 0.004)
    found = samples(m)
    assert labelled(found, "streametl_batch_seconds_count") == {(("agent", "pipeline.clean"),): 1}
    assert labelled(found, "streametl_event_to_output_seconds_count") == {(("agent", "pipeline.clean"),): 2}
    m.observe_rebalance("assign", 0.5)
    m.observe_rebalance("restore", 1.5)
    assert labelled(found, "streametl_event_to_output_seconds_count") == {(("agent", "pipeline.clean"),): 2}
    found = samples(m)
    assert labelled(found, "streametl_rebalances_total") == {(): 1}
    assert labelled(found, "streametl_rebalance_seconds_count") == {(("phase", "assign"),): 1,
                                                                    (("phase", "restore"),): 1}


async def test_http_middleware_labels_by_route_pattern():
    m = Metrics(Sources(progress=list))

    async def item(request):
        return web.json_response({"id": request.match_info["id"]})

    application = web.Application(middlewares=[m.middleware()])
    application.router.add_get("/items/{id}", item)
    async with TestClient(TestServer(application)) as client:
        for i in range(3):
            assert (await client.get(f"/items/{i}")).status == 200
        assert (await client.get("/nowhere")).status == 404
    found = samples(m)
    assert labelled(found, "streametl_http_requests_total") == {
        (("method", "GET"), ("route", "/items/{id}"), ("status", "200")): 3,
        (("method", "GET"), ("route", "unmatched"), ("status", "404")): 1,
    }
    assert labelled(found, "streametl_http_request_seconds_count")[(("method", "GET"), ("route", "/items/{id}"))] == 3


def status(worker: str, updated_at: float, n: int, partitions=()) -> dict:
    return status_record(worker=worker, host="h", web_port=1, started_at=0.0, now=updated_at,
                         progress=[(tp("ev", p), 10, 12, 1_000) for p in partitions],
                         pipelines={"clean": {**PIPELINES["clean"], "in": n}},
                         windows={"w": {"records": n, "emitted": 1}},
                         patterns={"records": n, "alerts": 1}, alerts_by_pattern={"fraud": 1})


def test_cluster_view_drops_stale_workers_and_sums_the_live_ones():
    records = {"h:2": status("h:2", 95.0, 5, [1]), "h:1": status("h:1", 99.0, 10, [0, 2]),
               "h:3": status("h:3", 80.0, 1000, [3])}  # stopped without a tombstone
    workers = live_workers(records, now=100.0, timeout=10.0)
    assert [w["worker"] for w in workers] == ["h:1", "h:2"]
    assert workers[0]["age_seconds"] == 1.0
    assert workers[0]["partitions"][0] == {"topic": "ev", "partition": 0, "lag_records": 2, "lag_seconds": 98.0}
    assert workers[0]["lag_records"] == 4
    total = totals(workers)
    assert total["workers"] == 2 and total["partitions"] == 3 and total["lag_records"] == 6
    assert total["pipelines"]["clean"] == {"in": 15, "out": 14, "dropped": 4, "dead_lettered": 2,
                                           "dropped_by_reason": {"filtered": 4}}
    assert total["windows"]["w"]["records"] == 15
    assert total["patterns"] == {"records": 15, "alerts": 2, "alerts_by_pattern": {"fraud": 2}}


def test_cluster_status_interval_must_be_below_the_timeout():
    Settings(cluster_status_interval=2.0, cluster_status_timeout=10.0).validate()
    for interval, timeout in ((0.0, 10.0), (10.0, 10.0)):
        try:
            Settings(cluster_status_interval=interval, cluster_status_timeout=timeout).validate()
        except SettingsError:
            continue
        raise AssertionError(f"accepted interval {interval} with timeout {timeout}")


class ProgressHost:
    """Just the state ``FastConsumer.partition_progress`` reads."""

    from app.transport import FastConsumer

    partition_progress = FastConsumer.partition_progress
    forget_batches = FastConsumer.forget_batches

    def __init__(self, assignment, ends, fetch_positions) -> None:
        from collections import defaultdict

        self._assignment, self._ends, self._fetch = assignment, ends, fetch_positions
        self._read_offset: dict = defaultdict(lambda: None)
        self._committed_offset: dict = defaultdict(lambda: None)
        self._last_timestamp: dict = {}
        self._batch_next: dict = {}

    def assignment(self):
        return set(self._assignment)

    def highwater(self, tp):
        return self._ends.get(tp)

    def _fetch_position(self, tp):
        return self._fetch.get(tp)


def test_partition_progress_positions():
    from faust.types import TP

    delivered, seeked, uncommitted = TP("ev", 0), TP("ev", 1), TP("ev", 2)
    host = ProgressHost([delivered, seeked, uncommitted], {delivered: 10, seeked: 20, uncommitted: 53},
                        {uncommitted: 53})
    host._read_offset[delivered] = 9  # the last record delivered to agents
    host._last_timestamp[delivered] = 7_000
    host._read_offset[seeked] = host._committed_offset[seeked] = 15  # committed: the next offset
    progress = {tp: rest for tp, *rest in host.partition_progress()}
    assert progress[delivered] == [10, 10, 7_000]
    assert progress[seeked] == [15, 20, None]
    # Never committed and nothing delivered in this assignment (an earlier owner's
    # processed records were re-fetched and dropped by a rebalance): the fetch position.
    assert progress[uncommitted] == [53, 53, None]

    # Revoked: its last timestamp goes, and a partition not assigned is not reported.
    host.forget_batches([delivered])
    host._assignment = [seeked]
    assert [tp for tp, *_ in host.partition_progress()] == [seeked]
    assert host._last_timestamp == {}


def test_open_table_stores_lists_only_open_rocksdb_partitions():
    """app.transport.open_table_stores reads Faust's open partition databases, never
    opens one (``_db_for_partition`` would), skips stores that are not RocksDB, and
    marks the standby partitions of the current assignment."""
    from faust.types.tuples import TP

    from app.transport import open_table_stores

    def opens(_partition):
        raise AssertionError("a scrape must not open a database")

    rocks = SimpleNamespace(name="t1", data=SimpleNamespace(_dbs={0: "db0", 2: "db2"}, _db_for_partition=opens),
                            changelog_topic=SimpleNamespace(get_topic_name=lambda: "app-t1-changelog"))
    memory = SimpleNamespace(name="t2", data={}, changelog_topic=None)
    app = SimpleNamespace(tables={"t1": rocks, "t2": memory},
                          assignor=SimpleNamespace(assigned_standbys=lambda: {TP("app-t1-changelog", 2)}))
    assert open_table_stores(app) == [("t1", 0, False, "db0"), ("t1", 2, True, "db2")]


def test_a_join_pipelines_counters_by_outcome():
    """A join pipeline's counters (agents/join.py) are exported per outcome."""
    join = {**PIPELINES["clean"], "join": {"left": 5, "right": 4, "pairs": 3, "unmatched": 1, "late": 2,
                                           "limited": 0, "replayed_skipped": 0}}
    sources = Sources(pipelines=lambda: {"paid": join}, windows=dict, patterns=lambda: ({}, {}),
                      progress=list, now=lambda: 10.0)
    found = labelled(samples(Metrics(sources)), "streametl_join_records_total")
    assert found[(("outcome", "pairs"), ("pipeline", "paid"))] == 3
    assert found[(("outcome", "late"), ("pipeline", "paid"))] == 2
    assert len(found) == 6


def test_a_stream_table_joins_counters_by_outcome():
    """A stream-table join's counters (agents/table_join.py) are exported with the
    outcomes it counts, none of the interval join's it does not."""
    join = {**PIPELINES["clean"], "join": {"with_table": "c", "table_topic": "c", "as_of": "latest", "stream": 5,
                                           "table": 4, "pairs": 3, "unmatched": 2, "beyond_history": 0,
                                           "table_late": 1, "replayed_skipped": 0}}
    sources = Sources(pipelines=lambda: {"enriched": join}, windows=dict, patterns=lambda: ({}, {}),
                      progress=list, now=lambda: 10.0)
    found = labelled(samples(Metrics(sources)), "streametl_join_records_total")
    assert found[(("outcome", "stream"), ("pipeline", "enriched"))] == 5
    assert found[(("outcome", "table_late"), ("pipeline", "enriched"))] == 1
    assert {dict(k)["outcome"] for k in found} == {"stream", "table", "pairs", "unmatched", "beyond_history",
                                                   "table_late"}
