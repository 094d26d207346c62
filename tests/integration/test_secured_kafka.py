"""streametl against a broker that demands SASL_SSL (issue 24).

`deploy/kafka/kafka.sh` starts a broker of this module's own with KAFKA_SECURITY=sasl_ssl:
its only client listener is SASL_SSL, its certificate is signed by a CA made at set-up,
and its SCRAM users are created at format time. Workers log in with SCRAM-SHA-512 over
TLS, serve their API over HTTPS with tokens on, and run a pipeline, a window,
`POST /api/v1/produce` and the aggregate route across two workers. A wrong password
and an untrusted CA stop a worker at once with a message naming the setting.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from app.kafka_security import check_connection, client_options
from app.settings import Settings
from tests.support import REPO, Worker, free_port, unique, write_config

KAFKA_SH = str(REPO / "deploy" / "kafka" / "kafka.sh")
USER, PASSWORD = "streametl", f"pw-{secrets.token_hex(8)}"
TOKEN = f"admin-{secrets.token_hex(12)}"


@pytest.fixture(scope="module")
def broker():
    """(bootstrap, tls folder) of a SASL_SSL-only broker on free ports."""
    port = free_port()
    env = {**os.environ, "KAFKA_PORT": str(port), "KAFKA_CONTROLLER_PORT": str(free_port()),
           "KAFKA_SECURITY": "sasl_ssl", "KAFKA_SASL_USERNAME": USER, "KAFKA_SASL_PASSWORD": PASSWORD}
    done = subprocess.run([KAFKA_SH, "start"], env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    home = Path(env.get("KAFKA_HOME_DIR", REPO / ".cache" / "kafka"))
    yield f"127.0.0.1:{port}", home / f"state-{port}-sasl_ssl" / "tls"
    subprocess.run([KAFKA_SH, "reset"], env=env, timeout=120, capture_output=True)


def secured_env(broker, mechanism: str = "SCRAM-SHA-512", **overrides: str) -> dict[str, str]:
    bootstrap, tls = broker
    env = {
        "STREAMETL_BROKER": f"kafka://{bootstrap}",
        "STREAMETL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "STREAMETL_KAFKA_SSL_CAFILE": str(tls / "ca.pem"),
        "STREAMETL_KAFKA_SASL_MECHANISM": mechanism,
        "STREAMETL_KAFKA_SASL_USERNAME": USER,
        "STREAMETL_KAFKA_SASL_PASSWORD": PASSWORD,
    }
    env.update(overrides)
    return env


def settings_for(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_every_mechanism_logs_in_over_tls(broker, mechanism):
    asyncio.run(check_connection(settings_for(secured_env(broker, mechanism)), timeout=20))


def https_worker(broker, name: str, config: str, **env: str) -> Worker:
    _, tls = broker
    env = secured_env(broker, STREAMETL_PIPELINES_FILE=config, STREAMETL_API_TOKENS=f"admin:{TOKEN}",
                      STREAMETL_WEB_SSL_CERTFILE=str(tls / "broker.pem"),
                      STREAMETL_WEB_SSL_KEYFILE=str(tls / "broker.key"), **env)
    return Worker(app_id=name, topic_prefix=f"{name}.", env=env, ca_file=str(tls / "ca.pem"), token=TOKEN)


async def read_all(settings: Settings, topic: str, expect: int, timeout: float = 90.0) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.bootstrap_servers, auto_offset_reset="earliest",
                                enable_auto_commit=False, **client_options(settings))
    await consumer.start()
    values: list[bytes] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(values) < expect and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            values += [r.value for records in batch.values() for r in records]
    finally:
        await consumer.stop()
    return values


def test_produce_a_pipeline_and_a_window_over_scram_sha_512_and_tls(broker):
    config = write_config({
        "pipelines": [{"name": "positive", "source": "events", "sink": "events.positive",
                       "steps": [{"op": "filter", "where": "value > 0"}]}],
        "windows": [{"name": "per_user", "source": "events", "key_by": "user_id", "time_field": "ts",
                     "window": {"type": "count", "size": 5}, "aggregations": [{"name": "n", "type": "count"}],
                     "emit": "update"}],
    })
    name = unique("sec")
    worker = https_worker(broker, name, config)
    try:
        worker.start(timeout=180)
        events = [{"user_id": f"u{i % 4}", "ts": 1_700_000_000 + i, "value": i} for i in range(20)]
        status, reply = worker.post("/api/v1/produce", {"topic": f"{name}.events", "messages": events})
        assert status == 200 and reply["count"] == 20, reply
        settings = settings_for(secured_env(broker))
        positive = asyncio.run(read_all(settings, f"{name}.events.positive", expect=19))
        assert len(positive) == 19
        updates = asyncio.run(read_all(settings, f"{name}.per_user.aggregates", expect=20))
        assert len(updates) == 20
    finally:
        worker.kill()
    assert PASSWORD not in worker.log_path.read_text(errors="replace")
    assert TOKEN not in worker.log_path.read_text(errors="replace")


def test_the_aggregate_route_across_two_workers_with_tokens_and_https(broker):
    name = unique("secagg")
    config = write_config({})
    workers = [https_worker(broker, name, config) for _ in range(2)]
    try:
        for w in workers:
            w.start(wait=False)
        for w in workers:
            w.wait_ready(180)
        body = {"window_id": "alt", "window_size": 100, "aggregation": "sum", "value_key": "v"}
        for i, v in enumerate([3, 1, 4, 1, 5, 9]):
            status, reply = workers[i % 2].post("/api/v1/aggregate", {**body, "record": {"v": v}})
            assert status == 200, reply
        assert reply["value"] == 23
        # The alerts view reads the alerts topic with its own client.
        status, reply = workers[1].get("/api/v1/alerts?limit=5")
        assert status == 200, reply
        # Without the token, over HTTPS: refused.
        status, _ = workers[0].http("GET", "/api/v1/aggregate/alt", headers={})
        assert status == 401
    finally:
        for w in workers:
            w.kill()


@pytest.mark.parametrize("overrides,named", [
    ({"STREAMETL_KAFKA_SASL_PASSWORD": "wrong-password"}, "STREAMETL_KAFKA_SASL_PASSWORD"),
    ({"STREAMETL_KAFKA_SSL_CAFILE": ""}, "STREAMETL_KAFKA_SSL_CAFILE"),
], ids=["wrong password", "untrusted CA"])
def test_refused_credentials_stop_the_worker_with_the_setting_named(broker, overrides, named):
    name = unique("secbad")
    worker = Worker(app_id=name, topic_prefix=f"{name}.", env=secured_env(broker, **overrides))
    worker.start(wait=False)
    try:
        assert worker.proc.wait(60) != 0
    finally:
        worker.kill()
    log = worker.log_path.read_text(errors="replace")
    assert "KafkaSecurityError" in log and named in log, log[-3000:]
    assert "wrong-password" not in log and PASSWORD not in log
