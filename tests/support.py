"""Test helpers shared by the integration and chaos tiers: a real worker process,
unique names on the shared broker, and plain aiokafka reads of what landed.

Nothing here mocks Kafka: workers are ``python -m app worker`` subprocesses talking to
the broker at STREAMETL_BROKER (default 127.0.0.1:9092) that ``make test`` started.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

REPO = Path(__file__).resolve().parent.parent
BOOTSTRAP = os.environ.get("STREAMETL_TEST_BOOTSTRAP", "127.0.0.1:9092")
#: Every worker process a test started, so a failed test can show their logs
#: (tests/conftest.py): a worker's data folder is gone once CI ends.
STARTED_WORKERS: list[Worker] = []


#: STREAMETL_KAFKA_* settings every client and worker here uses, for a secured broker
#: (``python -m bench --kafka-security K=V``); empty: plaintext.
KAFKA_SECURITY: dict[str, str] = {}


def use_kafka_security(env: Mapping[str, str]) -> None:
    KAFKA_SECURITY.clear()
    KAFKA_SECURITY.update(env)


def kafka_options() -> dict[str, Any]:
    """aiokafka arguments for :data:`KAFKA_SECURITY` (the app's own translation)."""
    if not KAFKA_SECURITY:
        return {}
    from app.kafka_security import client_options
    from app.settings import Settings

    return client_options(Settings.from_env(KAFKA_SECURITY))


def use_bootstrap(address: str) -> None:
    """Point every helper here (topics, producers, readers, workers) at another broker:
    ``python -m bench --bootstrap``."""
    global BOOTSTRAP
    BOOTSTRAP = address


def unique(prefix: str = "t") -> str:
    """A short unique name for an app id or topic prefix on the shared broker."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: Any = None, *, content_type: str = "application/json",
         raw: bytes | None = None, timeout: float = 30.0,
         headers: Mapping[str, str] | None = None, ca_file: str | None = None) -> tuple[int, Any]:
    """One HTTP call; returns (status, parsed JSON or text). Never raises on 4xx/5xx.

    With ``content_type=""`` urllib sends its default, application/x-www-form-urlencoded,
    as ``curl -d`` does."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None and content_type:
        req.add_header("Content-Type", content_type)
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode(errors="replace")


@dataclass
class Worker:
    """One ``streametl worker`` subprocess with its own web port and data dir."""

    app_id: str
    topic_prefix: str
    web_port: int = field(default_factory=free_port)
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="streametl-w-")))
    env: Mapping[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    #: Set when the worker serves HTTPS: the CA that signed its certificate.
    ca_file: str | None = None
    #: Sent as ``Authorization: Bearer`` with every call (API tokens on).
    token: str | None = None

    @property
    def url(self) -> str:
        if self.ca_file:
            return f"https://localhost:{self.web_port}"
        return f"http://127.0.0.1:{self.web_port}"

    def http(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        """One call to this worker, over HTTPS and with its token when it has them."""
        if self.token and "headers" not in kw:
            kw["headers"] = {"Authorization": f"Bearer {self.token}"}
        return http(method, self.url + path, body, ca_file=self.ca_file, **kw)

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMETL_")}
        env.update(
            STREAMETL_APP_ID=self.app_id,
            STREAMETL_TOPIC_PREFIX=self.topic_prefix,
            STREAMETL_BROKER=f"kafka://{BOOTSTRAP}",
            STREAMETL_WEB_PORT=str(self.web_port),
            STREAMETL_DATA_DIR=str(self.data_dir),
            PYTHONUNBUFFERED="1",
        )
        env.update(KAFKA_SECURITY)
        env.update(self.env)
        return env

    def start(self, wait: bool = True, timeout: float = 90.0) -> Worker:
        self.log_path = self.data_dir / f"worker-{self.web_port}.log"
        log = open(self.log_path, "ab")
        if not any(self is w for w in STARTED_WORKERS):
            STARTED_WORKERS.append(self)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "worker", "-l", "info", "--web-port", str(self.web_port)],
            cwd=REPO,
            env=self.environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _ = self.http("GET", "/health", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"worker on :{self.web_port} not ready in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful stop (SIGTERM), then SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """kill -9: no shutdown, no final commit, no flush."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def wipe_state(self) -> None:
        """Delete the worker's local RocksDB state (it must come back from changelogs)."""
        for child in self.data_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)

    def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        return self.http("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        return self.http("POST", path, body, **kw)

    def put(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        return self.http("PUT", path, body, **kw)

    def delete(self, path: str, **kw: Any) -> tuple[int, Any]:
        return self.http("DELETE", path, **kw)


def write_config(config: Mapping[str, Any]) -> str:
    """A pipelines file (STREAMETL_PIPELINES_FILE) in a temporary folder of its own."""
    import yaml

    path = Path(tempfile.mkdtemp(prefix="streametl-config-")) / "pipelines.yaml"
    path.write_text(yaml.safe_dump(dict(config)))
    return str(path)


def run(coro):
    """Run one coroutine to completion from sync test code."""
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def admin_client() -> AsyncIterator[AIOKafkaAdminClient]:
    """An admin client of the test broker, closed on leaving."""
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP, **kafka_options())
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def create_topics(names: list[str], partitions: int = 4, compacted: bool = False,
                        configs: dict[str, str] | None = None) -> None:
    """Create topics on the test broker (existing ones are left alone), with topic
    ``configs`` besides."""
    configs = {**({"cleanup.policy": "compact"} if compacted else {}), **(configs or {})}
    async with admin_client() as admin:
        existing = set(await admin.list_topics())
        new = [NewTopic(n, partitions, 1, topic_configs=configs) for n in names if n not in existing]
        if new:
            await admin.create_topics(new)


async def committed_offsets(group: str) -> dict[TopicPartition, int]:
    """The consumer group's committed offset of each partition it committed (≥ 0)."""
    async with admin_client() as admin:
        offsets = await admin.list_consumer_group_offsets(group)
    return {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


async def end_offsets(tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
    """The log-end offset of each of ``tps``."""
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, **kafka_options())
    await consumer.start()
    try:
        return await consumer.end_offsets(list(tps))
    finally:
        await consumer.stop()


async def committed_to_end(group: str, topics: Iterable[str], partitions: int = 4) -> bool:
    """True when ``group`` committed every record of ``topics``."""
    committed = await committed_offsets(group)
    ends = await end_offsets(TopicPartition(t, p) for t in topics for p in range(partitions))
    return all(committed.get(tp, 0) >= end for tp, end in ends.items())


async def produce_json(topic: str, records: list[Any], key: str | None = None,
                       raw: list[bytes] | None = None, partition: int | None = None) -> None:
    """Produce JSON records (keyed by field ``key`` when given; all into ``partition``
    when given) straight to Kafka."""
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", **kafka_options())
    await producer.start()
    try:
        futures = []
        for record in records:
            k = None if key is None else str(record[key]).encode()
            futures.append(await producer.send(topic, json.dumps(record).encode(), key=k, partition=partition))
        for value in raw or []:
            futures.append(await producer.send(topic, value))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


class LiveStream:
    """JSON events produced in the background, ``per_chunk`` every ``pause`` seconds
    (2,000/s by default), until ``events`` runs out or ``stop``: a stream that is still
    flowing whenever a test starts, stops or kills a worker."""

    def __init__(self, topic: str, events: Iterable[dict], key: str,
                 per_chunk: int = 100, pause: float = 0.05) -> None:
        self.topic, self.key, self.per_chunk, self.pause = topic, key, per_chunk, pause
        self._events = iter(events)
        self.sent: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=run, args=(self._produce(),), daemon=True)
        self._thread.start()

    async def _produce(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", **kafka_options())
        await producer.start()
        try:
            while not self._stop.is_set():
                chunk = list(itertools.islice(self._events, self.per_chunk))
                if not chunk:
                    return
                sent = [await producer.send(self.topic, json.dumps(r).encode(), key=str(r[self.key]).encode())
                        for r in chunk]
                await asyncio.gather(*sent)
                self.sent += chunk
                await asyncio.sleep(self.pause)
        finally:
            await producer.stop()

    def wait(self, timeout: float = 120.0) -> list[dict]:
        """Wait until every event is produced; returns them (all acknowledged)."""
        self._thread.join(timeout=timeout)
        return self.sent

    def stop(self) -> list[dict]:
        """Stop producing; returns every event produced (all acknowledged)."""
        self._stop.set()
        return self.wait(timeout=60)


@dataclass
class Consumed:
    """One record read back from a topic."""

    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    partition: int
    offset: int
    timestamp: int | None = None  # Kafka timestamp, ms

    def json(self) -> Any:
        return json.loads(self.value) if self.value is not None else None


async def read_topic(topic: str, *, expect: int | None = None, timeout: float = 30.0,
                     idle: float = 2.0, isolation_level: str = "read_uncommitted",
                     bootstrap: str | None = None) -> list[Consumed]:
    """Read a topic from the beginning with a plain aiokafka consumer (no group).

    Stops at ``expect`` records, or when nothing new arrived for ``idle`` seconds after
    reaching the end offsets the topic had when the read began, or at ``timeout``.
    ``bootstrap`` defaults to the test broker (the benchmarks pass theirs).

    Idleness alone is no end: on a loaded machine the first fetch can come later than
    ``idle``, and a read that stopped then would return nothing from a topic that holds
    records.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap or BOOTSTRAP, enable_auto_commit=False, **kafka_options(),
                                auto_offset_reset="earliest", isolation_level=isolation_level)
    await consumer.start()
    out: list[Consumed] = []
    try:
        parts = consumer.partitions_for_topic(topic)
        for _ in range(50):
            if parts:
                break
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.2)
            parts = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps) if tps else {}
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=10000)
            got = False
            for tp, msgs in batch.items():
                for m in msgs:
                    got = True
                    out.append(Consumed(m.key, m.value, dict(m.headers or ()), tp.partition, m.offset, m.timestamp))
            if got:
                last_new = time.monotonic()
            if expect is not None and len(out) >= expect:
                # A short extra read catches records beyond the expected count.
                extra = await consumer.getmany(timeout_ms=500)
                for tp, msgs in extra.items():
                    for m in msgs:
                        out.append(Consumed(m.key, m.value, dict(m.headers or ()), tp.partition, m.offset, m.timestamp))
                break
            if expect is None and time.monotonic() - last_new > idle and await read_to(consumer, ends):
                break
    finally:
        await consumer.stop()
    return out


async def read_to(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    """True when ``consumer`` has read each partition up to its offset in ``ends``
    (its position moves past transaction markers and aborted records too)."""
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return False
    return True


def assert_each_once(got_ids: Iterable[str], events: Iterable[Mapping[str, Any]]) -> None:
    """Every event's ``event_id`` exactly once among ``got_ids`` (the outputs' ids);
    otherwise how many are missing, repeated and unknown."""
    ids = Counter(got_ids)
    want = Counter(e["event_id"] for e in events)
    assert ids == want, (f"missing {len(set(want) - set(ids))}, "
                         f"repeated {sum(n - 1 for n in ids.values() if n > 1)}, "
                         f"unknown {len(set(ids) - set(want))}")


async def wait_for(predicate, timeout: float = 30.0, interval: float = 0.25, what: str = "condition"):
    """Poll an (a)sync predicate until it returns truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
