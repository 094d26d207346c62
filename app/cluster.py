"""The cluster view (GET /api/v1/cluster): every worker of the app id, with the
partitions it owns, its counters and its lag, answered alike by any worker.

Each worker publishes a small JSON status record, keyed by its worker id
(``host:web_port``), to the compacted ``cluster-status`` topic every
``STREAMETL_CLUSTER_STATUS_INTERVAL`` seconds, and tails that topic from the start (all
partitions, no consumer group, like the reference data: tables/reference.py). A
worker's view is the latest record of every worker, its own included, so two workers
answer the same once both have read the same records. A record older than
``STREAMETL_CLUSTER_STATUS_TIMEOUT`` no longer counts (a killed or hung worker
disappears then; workers' clocks are assumed in sync to well under that); a clean stop
publishes a tombstone, so the worker disappears at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from mode import Service

from app import app, settings
from app.kafka_io import kafka_io
from app.kafka_security import client_options
from app.metrics import consumer_progress, partition_lag
from app.topics import DECLARED, cluster_status

log = logging.getLogger(__name__)

#: Counters of a pipeline that are summed across workers.
PIPELINE_FIELDS = ("in", "out", "dropped", "dead_lettered")
#: Stats of a window that are summed across workers.
WINDOW_FIELDS = ("records", "emitted", "late", "dead_letters", "batches")


def worker_id(host: str, web_port: int) -> str:
    return f"{host}:{web_port}"


def status_record(*, worker: str, host: str, web_port: int, started_at: float, now: float,
                  progress: Iterable[tuple[Any, int | None, int | None, int | None]],
                  pipelines: Mapping[str, Mapping[str, Any]], windows: Mapping[str, Mapping[str, Any]],
                  patterns: Mapping[str, Any], alerts_by_pattern: Mapping[str, int]) -> dict[str, Any]:
    """This worker's status record (the value published on the topic)."""
    partitions = []
    for tp, position, end, last_ts in sorted(progress, key=lambda p: (p[0].topic, p[0].partition)):
        records, seconds = partition_lag(position, end, last_ts, now)
        partitions.append({"topic": tp.topic, "partition": tp.partition, "lag_records": records,
                           "lag_seconds": None if seconds is None else round(seconds, 3)})
    return {
        "worker": worker, "host": host, "web_port": web_port, "app_id": settings.app_id,
        "started_at": started_at, "updated_at": now,
        "partitions": partitions,
        "lag_records": sum(p["lag_records"] or 0 for p in partitions),
        "pipelines": {name: {f: c[f] for f in PIPELINE_FIELDS} | {"dropped_by_reason": dict(c["dropped_by_reason"])}
                      for name, c in pipelines.items()},
        "windows": {name: {f: s.get(f, 0) for f in WINDOW_FIELDS} for name, s in windows.items()},
        "patterns": {"records": patterns.get("records", 0), "alerts": patterns.get("alerts", 0),
                     "alerts_by_pattern": dict(alerts_by_pattern)},
    }


def live_workers(records: Mapping[str, Mapping[str, Any]], now: float, timeout: float) -> list[dict[str, Any]]:
    """The workers whose latest record is younger than ``timeout``, by worker id, each
    with its ``age_seconds``."""
    alive = []
    for wid in sorted(records):
        record = records[wid]
        age = now - float(record.get("updated_at", 0))
        if age <= timeout:
            alive.append({**record, "age_seconds": round(max(0.0, age), 3)})
    return alive


def totals(workers: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Cluster-wide sums of the workers' counters and lag."""
    pipelines: dict[str, dict[str, Any]] = {}
    windows: dict[str, dict[str, int]] = {}
    alerts_by_pattern: dict[str, int] = {}
    pattern_records = alerts = 0
    for w in workers:
        for name, c in w.get("pipelines", {}).items():
            total = pipelines.setdefault(name, {f: 0 for f in PIPELINE_FIELDS} | {"dropped_by_reason": {}})
            for f in PIPELINE_FIELDS:
                total[f] += c.get(f, 0)
            for reason, n in c.get("dropped_by_reason", {}).items():
                total["dropped_by_reason"][reason] = total["dropped_by_reason"].get(reason, 0) + n
        for name, s in w.get("windows", {}).items():
            total = windows.setdefault(name, {f: 0 for f in WINDOW_FIELDS})
            for f in WINDOW_FIELDS:
                total[f] += s.get(f, 0)
        p = w.get("patterns", {})
        pattern_records += p.get("records", 0)
        alerts += p.get("alerts", 0)
        for name, n in p.get("alerts_by_pattern", {}).items():
            alerts_by_pattern[name] = alerts_by_pattern.get(name, 0) + n
    return {
        "workers": len(workers),
        "partitions": sum(len(w.get("partitions", [])) for w in workers),
        "lag_records": sum(w.get("lag_records", 0) for w in workers),
        "pipelines": pipelines, "windows": windows,
        "patterns": {"records": pattern_records, "alerts": alerts, "alerts_by_pattern": alerts_by_pattern},
    }


def _counters() -> tuple[Mapping, Mapping, Mapping, Mapping]:
    pipeline = sys.modules.get("agents.pipeline")
    windows = sys.modules.get("agents.window_aggregate")
    patterns = sys.modules.get("agents.patterns")
    return (
        {} if pipeline is None else {n: c.as_dict() for n, c in pipeline.COUNTERS.items()},
        {} if windows is None else {n: dict(r.stats) for n, r in windows.RUNNERS.items()},
        {} if patterns is None else patterns.stats,
        {} if patterns is None else patterns.alerts_by_pattern,
    )


class ClusterStatus(Service):
    """Publishes this worker's status and keeps every worker's latest one."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: worker id -> its latest status record (tombstoned ones removed).
        self.records: dict[str, dict[str, Any]] = {}
        self.host = socket.gethostname()
        self.worker = ""
        self.started_at = time.time()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None

    @property
    def topic(self) -> str:
        return cluster_status.get_topic_name()

    def view(self, now: float | None = None) -> list[dict[str, Any]]:
        """The live workers (see :func:`live_workers`)."""
        return live_workers(self.records, time.time() if now is None else now,
                            settings.cluster_status_timeout)

    def status(self) -> dict[str, Any]:
        pipelines, windows, patterns, alerts_by_pattern = _counters()
        return status_record(worker=self.worker, host=self.host, web_port=app.conf.web_port,
                             started_at=self.started_at, now=time.time(), progress=consumer_progress(),
                             pipelines=pipelines, windows=windows, patterns=patterns,
                             alerts_by_pattern=alerts_by_pattern)

    async def on_start(self) -> None:
        # Named here: ``--web-port`` is applied after the app is built.
        self.worker = worker_id(self.host, app.conf.web_port)
        self._producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                          **client_options(settings))
        self._consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers,
                                          enable_auto_commit=False, auto_offset_reset="earliest",
                                          group_id=None, **client_options(settings))
        await self._producer.start()
        await self._consumer.start()
        self.add_future(self._tail())
        self.add_future(self._publish())

    async def on_stop(self) -> None:
        if self._producer is not None:
            if self.worker:
                try:  # gone at once for every other worker, instead of after the timeout
                    await asyncio.wait_for(
                        self._producer.send_and_wait(self.topic, None, key=self.worker.encode()), 3.0)
                except Exception as exc:  # noqa: BLE001 - the timeout removes it anyway
                    log.warning("cluster status: no tombstone published: %r", exc)
            await self._producer.stop()
        if self._consumer is not None:
            await self._consumer.stop()

    async def _publish(self) -> None:
        # The topic is created with the app's other topics, before kafka_io is ready.
        await kafka_io.ready.wait()
        while not self.should_stop:
            try:
                value = orjson.dumps(self.status())
                await self._producer.send_and_wait(self.topic, value, key=self.worker.encode())
            except Exception as exc:  # noqa: BLE001 - a missed status only ages this worker
                log.warning("cluster status not published: %r", exc)
            await asyncio.sleep(settings.cluster_status_interval)

    async def _tail(self) -> None:
        await kafka_io.ready.wait()
        consumer = self._consumer
        assert consumer is not None
        tps = [TopicPartition(self.topic, p) for p in range(DECLARED[self.topic].partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while not self.should_stop:
            batch = await consumer.getmany(timeout_ms=500, max_records=1000)
            for messages in batch.values():
                for m in messages:
                    self._apply(m.key, m.value)

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        wid = key.decode(errors="replace")
        if value is None:
            self.records.pop(wid, None)
            return
        try:
            record = orjson.loads(value)
        except orjson.JSONDecodeError:
            return
        if isinstance(record, dict) and record.get("app_id") == settings.app_id:
            self.records[wid] = record


#: This worker's cluster view (None when ``STREAMETL_METRICS=false``).
cluster: ClusterStatus | None = None
if settings.metrics:
    cluster = ClusterStatus()
    app.service(cluster)

__all__ = ["ClusterStatus", "cluster", "live_workers", "status_record", "totals", "worker_id"]
