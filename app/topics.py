"""Every Kafka topic the app owns, declared in one place with its partition count.

Values are read as raw bytes and parsed by our own code (``app.codec``): a record that
is not valid JSON must reach the dead-letter topic, not crash Faust's deserializer.
Topics are ``internal`` so Faust creates them with the partition count given here;
``ensure_topics`` also creates the ones no agent subscribes to (sinks, dlq, alerts).
"""

from __future__ import annotations

from dataclasses import dataclass

import faust

from app import app, settings


@dataclass(frozen=True)
class TopicSpec:
    """How one of the app's topics is created."""

    name: str
    partitions: int
    compacted: bool = False


#: Every topic the app declares, by Kafka name.
DECLARED: dict[str, TopicSpec] = {}


def declare(logical_name: str, *, partitions: int | None = None, compacted: bool = False):
    """Declare (once) and return the Faust topic for one of the app's logical topics."""
    name = settings.topic(logical_name)
    spec = TopicSpec(name, partitions or settings.topic_partitions, compacted)
    known = DECLARED.get(name)
    if known is not None and known != spec:
        raise ValueError(f"topic {name} declared twice with different specs: {known} vs {spec}")
    DECLARED[name] = spec
    return app.topic(
        name,
        partitions=spec.partitions,
        key_serializer="raw",
        value_serializer="raw",
        internal=True,
        compacting=compacted or None,
        deleting=None if compacted else True,
    )


events = declare("events")
dead_letters = declare("dlq")
#: One status record per worker, keyed by worker id (app/cluster.py); compacted, so a
#: reader finds each worker's latest record.
cluster_status = declare("cluster-status", partitions=1, compacted=True)

__all__ = ["DECLARED", "TopicSpec", "cluster_status", "declare", "events", "dead_letters", "faust"]
