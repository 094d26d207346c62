"""Fixtures for every tier. Integration and chaos tests need the real broker that
``make test`` starts; they fail loudly (never skip silently) when it is not there."""

from __future__ import annotations

import socket

import pytest

from tests.support import BOOTSTRAP, Worker, unique


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
