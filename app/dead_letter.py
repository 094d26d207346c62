"""The dead-letter topic: every record we cannot use goes here with the reason.

The original bytes are kept as they were (key and value), and the headers say where
the record came from and why it was refused, so nothing is lost and it can be replayed.
"""

from __future__ import annotations

import logging
from typing import Any

from app.batches import from_partition
from app.topics import dead_letters

log = logging.getLogger(__name__)


def dead_letter_headers(
    *, reason: str, message: str, source_topic: str | None, pipeline: str | None = None,
    step: str | None = None, partition: int | None = None, offset: int | None = None,
) -> list[tuple[str, bytes]]:
    """The headers of one dead letter; values are UTF-8, absent ones left out."""
    pairs: dict[str, Any] = {
        "dlq.reason": reason,
        "dlq.message": message[:1000],
        "dlq.source_topic": source_topic,
        "dlq.pipeline": pipeline,
        "dlq.step": step,
        "dlq.partition": partition,
        "dlq.offset": offset,
    }
    return [(k, str(v).encode()) for k, v in pairs.items() if v is not None]


async def send_dead_letter(
    key: bytes | None, value: bytes | None, *, reason: str, message: str,
    source_topic: str | None, pipeline: str | None = None, step: str | None = None,
    partition: int | None = None, offset: int | None = None,
) -> None:
    """Send one refused record to the dead-letter topic (inside the current
    transaction when processing is exactly-once, since it goes through Faust: the one
    of ``partition``, the refused record's own, when a batch of its topic is being
    processed; ``app.batches.from_partition``)."""
    headers = dead_letter_headers(
        reason=reason, message=message, source_topic=source_topic, pipeline=pipeline,
        step=step, partition=partition, offset=offset,
    )
    log.debug("dead letter from %s: %s", source_topic, reason)
    with from_partition(partition):
        await dead_letters.send(key=key, value=value if value is not None else b"", headers=headers)
