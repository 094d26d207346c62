"""A starting worker waits for an unreachable broker (issue 23: workers restarted during
a broker restart exited at once, "Unable to bootstrap", six times in one chaos run)."""

from __future__ import annotations

import asyncio
import dataclasses

from app import kafka_security
from app.settings import Settings


def test_a_starting_worker_waits_until_the_broker_answers(monkeypatch):
    answers = [ConnectionRefusedError(111, "refused"), ConnectionRefusedError(111, "refused"), None]
    probed = []

    async def probe(settings, timeout):
        probed.append(timeout)
        return answers.pop(0)

    async def no_sleep(seconds):
        pass

    monkeypatch.setattr(kafka_security, "unreachable", probe)
    monkeypatch.setattr(kafka_security.asyncio, "sleep", no_sleep)
    asyncio.run(kafka_security.wait_for_broker(Settings()))
    assert len(probed) == 3 and answers == []


def test_the_wait_is_bounded(monkeypatch):
    """Past ``broker_wait`` the start goes on (and the client's own error follows)."""
    settings = dataclasses.replace(Settings(), broker_wait=0.3)
    probed = []

    async def probe(settings, timeout):
        probed.append(1)
        return ConnectionRefusedError(111, "refused")

    monkeypatch.setattr(kafka_security, "unreachable", probe)

    async def main():
        loop = asyncio.get_running_loop()
        started = loop.time()
        await kafka_security.wait_for_broker(settings)
        return loop.time() - started

    waited = asyncio.run(main())
    assert 0.3 <= waited < 5 and len(probed) >= 1


def test_reachability_is_a_tcp_connection_not_a_login():
    """A broker that refuses the worker's credentials is reachable: the start goes on at
    once to ``check_connection``, which names the setting (tests/integration/
    test_secured_kafka.py)."""
    async def main():
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        settings = dataclasses.replace(Settings(), broker=f"kafka://127.0.0.1:{port}")
        try:
            return await kafka_security.unreachable(settings, 2.0)
        finally:
            server.close()

    assert asyncio.run(main()) is None
