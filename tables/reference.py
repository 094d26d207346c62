"""Reference data: a table fed by its own compacted topic, replicated on every worker.

Rows are written (``PUT /api/v1/reference/{name}``) to the compacted ``reference``
topic, keyed ``<name>/<key>``. Every worker tails the whole topic (all partitions, no
consumer group) into an in-memory map: the GlobalKTable pattern (app/global_topics.py).
A restart rebuilds the map from the compacted topic, so nothing is kept locally that
Kafka does not hold.
Pipelines wait until the map has caught up with the topic's end before enriching, and
a writer waits until its own worker has read its rows back (read-your-writes).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import orjson

from app import app
from app.global_topics import GlobalTopicReader
from app.topics import declare

log = logging.getLogger(__name__)

reference_topic = declare("reference", compacted=True)

#: Names of reference data sets (the ``{name}`` in the URL).
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def row_key(name: str, key: str) -> bytes:
    return f"{name}/{key}".encode()


class ReferenceStore(GlobalTopicReader):
    """The in-memory replica of the reference topic on this worker."""

    label = "reference data"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows: dict[str, dict[str, Mapping[str, Any]]] = {}

    def lookup(self, name: str, key: str) -> Mapping[str, Any] | None:
        """One row, or None."""
        rows = self.rows.get(name)
        return None if rows is None else rows.get(key)

    def topics(self) -> list[str]:
        return [reference_topic.get_topic_name()]

    def on_caught_up(self) -> None:
        log.info("reference data caught up: %d sets", len(self.rows))

    def apply(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        name, _, k = key.decode(errors="replace").partition("/")
        if value is None:  # tombstone: the row was deleted
            self.rows.get(name, {}).pop(k, None)
            return
        try:
            row = orjson.loads(value)
        except orjson.JSONDecodeError:
            log.warning("reference row %r is not JSON; ignored", key)
            return
        if isinstance(row, dict):
            self.rows.setdefault(name, {})[k] = row

    async def wait_for(self, positions: Mapping[int, int], timeout: float = 10.0) -> bool:
        """Wait until this replica has read every partition up to the given offsets."""
        return await self.wait_for_offsets(reference_topic.get_topic_name(), positions, timeout)


reference_store = ReferenceStore()
app.service(reference_store)
