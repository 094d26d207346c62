"""Fixtures for every tier. Integration and chaos tests need the real broker that
``make test`` starts; they fail loudly (never skip silently) when it is not there."""

from __future__ import annotations

import socket

import pytest

from tests.support import BOOTSTRAP, STARTED_WORKERS, Worker, unique

#: Log lines of each worker a failed test shows.
FAILED_TEST_LOG_LINES = 150


def pytest_runtest_setup(item):
    item.workers_before = len(STARTED_WORKERS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test shows the log tail of every worker still running and of every
    worker it started: a worker's log lives in its data folder, gone once CI ends."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    mine = STARTED_WORKERS[getattr(item, "workers_before", len(STARTED_WORKERS)):]
    for w in STARTED_WORKERS:
        running = w.proc is not None and w.proc.poll() is None
        if running or any(w is m for m in mine):
            state = "running" if running else f"exited {w.proc.returncode if w.proc else None}"
            report.sections.append((f"worker {w.app_id} :{w.web_port} ({state}), last log lines",
                                    w.log_tail(FAILED_TEST_LOG_LINES)))


def broker_reachable() -> bool:
    host, port = BOOTSTRAP.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def kafka() -> str:
    """The bootstrap address of the real test broker."""
    if not broker_reachable():
        pytest.fail(f"no Kafka broker at {BOOTSTRAP}: run `make test` (it starts one)")
    return BOOTSTRAP


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The DSN of the real test PostgreSQL that `make test` starts."""
    import asyncio
    import os

    import asyncpg

    dsn = os.environ.get("STREAMETL_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5433/streametl")

    async def ping() -> None:
        conn = await asyncpg.connect(dsn, timeout=5)
        await conn.close()

    try:
        asyncio.run(ping())
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"no PostgreSQL at {dsn} ({exc}): run `make test` (it starts one)")
    return dsn


@pytest.fixture
def namespace(kafka) -> tuple[str, str]:
    """A unique (app_id, topic_prefix) so tests share the broker without colliding."""
    name = unique()
    return name, f"{name}."


@pytest.fixture
def workers(namespace):
    """A factory of worker processes in this test's namespace; all stopped afterwards."""
    app_id, prefix = namespace
    started: list[Worker] = []

    def make(**env: str) -> Worker:
        w = Worker(app_id=app_id, topic_prefix=prefix, env=env)
        started.append(w)
        return w

    yield make
    for w in started:
        w.kill()
