"""Prometheus metrics of one worker: ``GET /metrics`` (web/metrics.py).

Two kinds, so that the consume path pays nothing per record:

- Counters and gauges are read at scrape time by :class:`StreamCollector` from what the
  agents count anyway (the counters GET /api/v1/pipelines, /windows and /patterns
  report), from the consumer's current assignment (lag) and from the RocksDB properties
  of the table partitions open now (state store sizes). A revoked partition is neither
  assigned nor open, so it has no series after a rebalance (no stale sensors,
  faust-streaming/faust#72).
- Histograms are observed once per batch, per commit, per state flush, per rebalance
  and per HTTP request (the observers in ``app.transport.observers``).

Every metric lives in a registry of this worker's own (:attr:`Metrics.registry`), not
prometheus-client's process-global one, so tests can build several side by side.
``STREAMETL_METRICS=false`` builds none of it (:data:`METRICS` is None).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.settings import settings

#: Seconds: one batch of a batch agent, a commit, a state flush.
WORK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Seconds from a record's timestamp to its batch's outputs; rebalances and restores.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
_timestamp = attrgetter("timestamp")
#: Seconds of one HTTP request.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


#: The outcomes of a join pipeline's records (agents/join.py: ``JoinRunner.describe``;
#: a stream-table join, agents/table_join.py, has those it counts).
JOIN_OUTCOMES = ("left", "right", "pairs", "unmatched", "late", "limited", "stream", "table", "beyond_history",
                 "table_late")


def _pipelines() -> Mapping[str, Mapping[str, Any]]:
    module = sys.modules.get("agents.pipeline")
    return {} if module is None else {name: c.as_dict() for name, c in module.COUNTERS.items()}


def _windows() -> Mapping[str, Mapping[str, Any]]:
    module = sys.modules.get("agents.window_aggregate")
    return {} if module is None else {name: dict(r.stats) for name, r in module.RUNNERS.items()}


def _patterns() -> tuple[Mapping[str, Any], Mapping[str, int]]:
    module = sys.modules.get("agents.patterns")
    if module is None:
        return {}, {}
    return module.stats, dict(module.alerts_by_pattern)


#: Faust's leader-election topic (``<app id>-__assignor-__leader``): not input.
LEADER_TOPIC_SUFFIX = "-__assignor-__leader"


def consumer_progress() -> list[tuple[Any, int | None, int | None, int | None]]:
    """The consumer's partition progress (``FastConsumer.partition_progress``) on the
    topics agents read: the tables' changelogs (read only to restore state) and Faust's
    leader topic, which the consumer is assigned too, are left out."""
    module = sys.modules.get("app")
    app = getattr(module, "app", None)
    if app is None or not app.started:
        return []
    progress = app.consumer.partition_progress
    try:
        changelogs = app.tables.changelog_topics
        return [p for p in progress()
                if p[0].topic not in changelogs and not p[0].topic.endswith(LEADER_TOPIC_SUFFIX)]
    except Exception:  # the consumer is starting or stopping: no assignment to report
        return []


#: One open state store partition: (store, partition, standby?, keys, disk bytes, memtable bytes).
StoreSize = tuple[str, int, bool, int | None, int | None, int | None]


def store_size(db: Any) -> tuple[int | None, int | None, int | None]:
    """(keys, bytes on disk, bytes in memtables) of one RocksDB, from its own
    properties (O(1): RocksDB keeps them; the key count is its estimate, exact only
    after compaction, since an overwritten or deleted key counts until then)."""
    read = db.property_int_value
    return (read("rocksdb.estimate-num-keys"), read("rocksdb.total-sst-files-size"),
            read("rocksdb.cur-size-all-mem-tables"))


def state_stores() -> list[StoreSize]:
    """The sizes of every table partition whose RocksDB is open on this worker now."""
    module = sys.modules.get("app")
    app = getattr(module, "app", None)
    if app is None or not app.started:
        return []
    from app.transport import open_table_stores

    try:
        stores = open_table_stores(app)
    except Exception:  # the worker is starting or stopping
        return []
    # Sizes only: no database reference outlives this call (open_table_stores).
    return [(name, partition, standby, *store_size(db)) for name, partition, standby, db in stores]


@dataclass
class Sources:
    """Where the scrape-time collector reads from (replaced in unit tests)."""

    pipelines: Callable[[], Mapping[str, Mapping[str, Any]]] = _pipelines
    windows: Callable[[], Mapping[str, Mapping[str, Any]]] = _windows
    patterns: Callable[[], tuple[Mapping[str, Any], Mapping[str, int]]] = _patterns
    progress: Callable[[], list[tuple[Any, int | None, int | None, int | None]]] = consumer_progress
    stores: Callable[[], list[StoreSize]] = state_stores
    now: Callable[[], float] = field(default=time.time)


def partition_lag(position: int | None, end: int | None, last_timestamp_ms: int | None,
                  now: float) -> tuple[int | None, float | None]:
    """(lag in records, lag in seconds) of one partition; None where not known.

    Records: end offset minus the next offset to process (the whole log when nothing was
    processed or committed yet). Seconds: 0 when caught up, else the age of the last
    record this worker processed there: the records behind it were written after it,
    so none of them has waited longer (an upper bound, cheap: one timestamp kept per
    partition per batch)."""
    if end is None:
        return None, None
    records = max(0, end - (position or 0))
    if records == 0:
        return 0, 0.0
    if last_timestamp_ms is None:
        return records, None
    return records, max(0.0, now - last_timestamp_ms / 1000.0)


#: GET /api/v1/windows stats -> (metric suffix, help).
WINDOW_COUNTERS = {
    "records": ("records_in", "Records applied to the window's state"),
    "emitted": ("results_emitted", "Window results and late records emitted"),
    "late": ("records_late", "Records that arrived after their window closed"),
    "dead_letters": ("records_dead_lettered", "Records sent to the dead-letter topic"),
    "replayed_skipped": ("records_replayed_skipped", "Replayed records skipped (already applied)"),
    "idle_closed": ("windows_idle_closed", "Windows closed by the idle rule"),
    "made_ahead": ("results_made_ahead", "Final results made before their window end (live tumbling windows)"),
    "batches": ("batches", "Batches handled"),
    "flushes": ("state_flushes", "Write-back flushes of the window's state"),
}


class StreamCollector(Collector):
    """Reads the agents' own counters and the consumer's assignment at scrape time."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    def collect(self) -> Iterable[Metric]:
        yield from self._pipelines()
        yield from self._windows()
        yield from self._patterns()
        yield from self._lag()
        yield from self._stores()

    def _stores(self) -> Iterable[Metric]:
        labels = ["store", "partition", "role"]
        keys = GaugeMetricFamily("streametl_state_store_keys",
                                 "Keys in a state store partition (RocksDB's estimate-num-keys)", labels=labels)
        disk = GaugeMetricFamily("streametl_state_store_disk_bytes",
                                 "Bytes of a state store partition's SST files (total-sst-files-size)",
                                 labels=labels)
        memory = GaugeMetricFamily("streametl_state_store_memtable_bytes",
                                   "Bytes of a state store partition's memtables (cur-size-all-mem-tables)",
                                   labels=labels)
        for name, partition, standby, n_keys, n_disk, n_memory in self.sources.stores():
            values = [name, str(partition), "standby" if standby else "active"]
            for family, value in ((keys, n_keys), (disk, n_disk), (memory, n_memory)):
                if value is not None:
                    family.add_metric(values, value)
        yield from (keys, disk, memory)

    def _pipelines(self) -> Iterable[Metric]:
        into = CounterMetricFamily("streametl_pipeline_records_in", "Records read by a pipeline",
                                   labels=["pipeline"])
        out = CounterMetricFamily("streametl_pipeline_records_out", "Records a pipeline wrote to its sink",
                                  labels=["pipeline"])
        dropped = CounterMetricFamily("streametl_pipeline_records_dropped",
                                      "Records a pipeline step dropped, by reason", labels=["pipeline", "reason"])
        dead = CounterMetricFamily("streametl_pipeline_records_dead_lettered",
                                   "Records a pipeline sent to the dead-letter topic", labels=["pipeline"])
        joins = CounterMetricFamily("streametl_join_records",
                                    "A join pipeline's records by outcome (left, right read; pairs, unmatched "
                                    "emitted; late; limited: pairs left out by max_matches; a stream-table join: stream, "
                                    "table read, beyond_history, table_late)",
                                    labels=["pipeline", "outcome"])
        for name, c in self.sources.pipelines().items():
            into.add_metric([name], c["in"])
            out.add_metric([name], c["out"])
            dead.add_metric([name], c["dead_lettered"])
            for reason, n in c["dropped_by_reason"].items():
                dropped.add_metric([name, reason], n)
            for outcome in JOIN_OUTCOMES if "join" in c else ():
                if outcome in c["join"]:
                    joins.add_metric([name, outcome], c["join"][outcome])
        yield from (into, out, dropped, dead, joins)

    def _windows(self) -> Iterable[Metric]:
        families = {
            key: CounterMetricFamily(f"streametl_window_{suffix}", text, labels=["window"])
            for key, (suffix, text) in WINDOW_COUNTERS.items()
        }
        for name, stats in self.sources.windows().items():
            for key, family in families.items():
                family.add_metric([name], stats.get(key, 0))
        yield from families.values()

    def _patterns(self) -> Iterable[Metric]:
        engine, by_pattern = self.sources.patterns()
        records = CounterMetricFamily("streametl_pattern_records_in", "Records the pattern engine read")
        records.add_metric([], engine.get("records", 0))
        alerts = CounterMetricFamily("streametl_pattern_alerts", "Alerts sent, by pattern", labels=["pattern"])
        for name, n in by_pattern.items():
            alerts.add_metric([name], n)
        yield from (records, alerts)

    def _lag(self) -> Iterable[Metric]:
        labels = ["topic", "partition"]
        assigned = GaugeMetricFamily("streametl_consumer_assigned_partitions",
                                     "Partitions assigned to this worker now")
        position = GaugeMetricFamily("streametl_consumer_position",
                                     "Next offset to process, per assigned partition", labels=labels)
        end = GaugeMetricFamily("streametl_consumer_end_offset",
                                "End offset (the last stable offset: the worker reads read_committed) at the last fetch",
                                labels=labels)
        lag = GaugeMetricFamily("streametl_consumer_lag_records",
                                "Records not processed yet, per assigned partition", labels=labels)
        lag_s = GaugeMetricFamily("streametl_consumer_lag_seconds",
                                  "Age of the last processed record while records wait (0: caught up)",
                                  labels=labels)
        now = self.sources.now()
        progress = self.sources.progress()
        assigned.add_metric([], len(progress))
        for tp, pos, high, last_ts in progress:
            values = [tp.topic, str(tp.partition)]
            if pos is not None:
                position.add_metric(values, pos)
            if high is not None:
                end.add_metric(values, high)
            records, seconds = partition_lag(pos, high, last_ts, now)
            if records is not None:
                lag.add_metric(values, records)
            if seconds is not None:
                lag_s.add_metric(values, seconds)
        yield from (assigned, position, end, lag, lag_s)


class Metrics:
    """Every metric of one worker, in a registry of its own."""

    def __init__(self, sources: Sources | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.batch_seconds = Histogram(
            "streametl_batch_seconds", "Time a batch agent took for one batch", ["agent"],
            buckets=WORK_BUCKETS, registry=r)
        self.output_latency = Histogram(
            "streametl_event_to_output_seconds",
            "From a record's Kafka timestamp to the end of its batch (outputs sent); "
            "the oldest record (by timestamp) of each partition of each batch", ["agent"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.commit_seconds = Histogram(
            "streametl_commit_seconds", "Time one offset commit took (state flushes before it included)",
            buckets=WORK_BUCKETS, registry=r)
        self.commit_hold_seconds = Histogram(
            "streametl_commit_hold_seconds",
            "Time one commit section kept batches out (under at_least_once a snapshot or one part of its encoding)",
            buckets=WORK_BUCKETS, registry=r)
        self.flush_seconds = Histogram(
            "streametl_state_flush_seconds", "Time one write-back flush of state took", ["store"],
            buckets=WORK_BUCKETS, registry=r)
        self.rebalances = Counter("streametl_rebalances", "Rebalances this worker took part in", registry=r)
        self.rebalance_seconds = Histogram(
            "streametl_rebalance_seconds",
            "assign: rebalance start to partitions assigned; restore: then to tables recovered",
            ["phase"], buckets=LATENCY_BUCKETS, registry=r)
        self.http_requests = Counter(
            "streametl_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=r)
        self.http_seconds = Histogram(
            "streametl_http_request_seconds", "Time to answer one HTTP request", ["method", "route"],
            buckets=HTTP_BUCKETS, registry=r)
        r.register(StreamCollector(sources or Sources()))
        # The process's CPU, memory and file descriptors, and Python's collections, as
        # the default registry has them (read at scrape time).
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        #: agent name -> (batch histogram child, latency histogram child)
        self._agents: dict[str, tuple[Any, Any]] = {}

    def observe_batch(self, agent: str, batch: Any, seconds: float) -> None:
        children = self._agents.get(agent)
        if children is None:
            children = self._agents[agent] = (self.batch_seconds.labels(agent), self.output_latency.labels(agent))
        children[0].observe(seconds)
        now = time.time()
        latency = children[1]
        for _tp, records in batch.parts:
            # The oldest record by its timestamp, not the first by offset: producers
            # that stamp records with their event time (several producers, a connector
            # replaying a source) append them out of time order. A scan in C, about
            # 25-55 ns a record on this machine: the only per-record work of metrics.
            try:
                ts = min(map(_timestamp, records))
            except TypeError:  # a record without a timestamp (None): no age to tell
                continue
            if ts is not None and ts >= 0:
                latency.observe(max(0.0, now - ts / 1000.0))

    def observe_rebalance(self, phase: str, seconds: float) -> None:
        if phase == "assign":
            self.rebalances.inc()
        self.rebalance_seconds.labels(phase).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def middleware(self) -> Any:
        """aiohttp middleware: count and time every request by route pattern."""
        requests, seconds = self.http_requests, self.http_seconds

        @web.middleware
        async def http_metrics(request: web.Request, handler: Any) -> web.StreamResponse:
            t0 = time.perf_counter()
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                resource = request.match_info.route.resource
                # The pattern (``/api/v1/aggregate/{window_id}``), never the path: one
                # series per route, whatever clients ask for.
                route = resource.canonical if resource is not None else "unmatched"
                requests.labels(request.method, route, str(status)).inc()
                seconds.labels(request.method, route).observe(time.perf_counter() - t0)

        return http_metrics


#: This worker's metrics (None when ``STREAMETL_METRICS=false``).
METRICS: Metrics | None = Metrics() if settings.metrics else None


def observe_flush(store: str, seconds: float) -> None:
    """One write-back flush of ``store`` took ``seconds`` (nothing when metrics are off)."""
    if METRICS is not None:
        METRICS.flush_seconds.labels(store).observe(seconds)


def install() -> None:
    """Let the consume path report its timings (``app.transport.observers``)."""
    if METRICS is None:
        return
    from app.transport import observers

    observers.batch = METRICS.observe_batch
    observers.commit = METRICS.commit_seconds.observe
    observers.commit_hold = METRICS.commit_hold_seconds.observe
    observers.rebalance = METRICS.observe_rebalance


__all__ = ["METRICS", "Metrics", "Sources", "StreamCollector", "install", "observe_flush", "partition_lag",
           "state_stores", "store_size"]
