"""The table manager's start (app/transport.py ``TableManager.on_start``), no broker.

Faust's slept a second before registering the changelog channels and starting the
recovery: a fixed second of every worker start (issue 22: a clean restart healthy within
5 s). Every table is declared before the worker starts, so nothing waits for it now."""

from __future__ import annotations

import asyncio

from app.transport import TableManager


class Recovery:
    started = False

    async def start(self) -> None:
        self.started = True


class Manager:
    """What ``on_start`` uses; ``sleep`` (mode's ``Service.sleep``) fails the test."""

    on_start = TableManager.on_start
    should_stop = False

    def __init__(self) -> None:
        self.recovery = Recovery()
        self.channels_updated = False

    async def _update_channels(self) -> None:
        self.channels_updated = True

    async def sleep(self, seconds: float) -> None:
        raise AssertionError(f"slept {seconds} s")


def test_the_table_manager_starts_the_recovery_without_sleeping_first():
    manager = Manager()
    asyncio.run(manager.on_start())
    assert manager.channels_updated and manager.recovery.started
