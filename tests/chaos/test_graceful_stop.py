"""A graceful stop (SIGTERM: Ctrl-C, `docker stop`, systemd) ends a worker within 10 s,
with its broker up and with it gone (issue 17).

A worker that had served ``POST /api/v1/aggregate`` never stopped: the last reply of
its request/reply topic stayed unacked and ``wait_empty`` waited for it for good. With
the broker gone the final commit retried for 40 s and more; ``Settings.stop_timeout``
bounds the whole stop (app/transport.py ``arm_stop_deadline``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.support import REPO, Worker, free_port, unique

#: What the issue asks of a graceful stop (Kafka Streams' close timeout is of this order).
STOP_LIMIT = 10.0
KAFKA_SH = str(REPO / "deploy" / "kafka" / "kafka.sh")


def aggregate_calls(worker: Worker, window_id: str, n: int = 3) -> None:
    for i in range(n):
        status, reply = worker.post("/api/v1/aggregate", {
            "window_id": window_id, "record": {"value": i + 1},
            "window_size": 100, "aggregation": "sum", "value_key": "value"})
        assert status == 200, reply


def seconds_to_stop(worker: Worker) -> float:
    """SIGTERM, then how long until the process was gone (at most STOP_LIMIT + 30)."""
    assert worker.proc is not None
    started = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    try:
        worker.proc.wait(STOP_LIMIT + 30)
    except subprocess.TimeoutExpired:
        worker.kill()
    return time.monotonic() - started


def test_sigterm_after_aggregate_calls_stops_within_10s_and_commits(workers):
    worker = workers().start(timeout=150)
    aggregate_calls(worker, "stop-me")
    elapsed = seconds_to_stop(worker)
    assert elapsed <= STOP_LIMIT, f"stopped after {elapsed:.1f}s:\n{worker.log_tail()}"
    assert worker.proc.returncode == 0, worker.log_tail()
    # What was applied before the stop is there after a restart on the same folder.
    worker.start(timeout=150)
    status, state = worker.get("/api/v1/aggregate/stop-me")
    assert status == 200, state
    assert state["windows"][0]["count"] == 3
    assert state["windows"][0]["aggregates"] == {"sum": 6}


@pytest.fixture
def private_broker():
    """A broker of this test's own (it is stopped mid-test), on free ports."""
    env = {**os.environ, "KAFKA_PORT": str(free_port()), "KAFKA_CONTROLLER_PORT": str(free_port())}
    subprocess.run([KAFKA_SH, "start"], env=env, check=True, timeout=240, capture_output=True)
    yield env
    subprocess.run([KAFKA_SH, "reset"], env=env, timeout=120, capture_output=True)


def test_sigterm_with_the_broker_gone_stops_within_10s(private_broker):
    name = unique()
    worker = Worker(app_id=name, topic_prefix=f"{name}.",
                    env={"STREAMETL_BROKER": f"kafka://127.0.0.1:{private_broker['KAFKA_PORT']}"})
    try:
        worker.start(timeout=150)
        aggregate_calls(worker, "broker-gone")
        subprocess.run([KAFKA_SH, "stop"], env=private_broker, check=True, timeout=120, capture_output=True)
        elapsed = seconds_to_stop(worker)
        assert elapsed <= STOP_LIMIT, f"stopped after {elapsed:.1f}s:\n{worker.log_tail()}"
    finally:
        worker.kill()
