"""The local broker of the tests and ``make run`` (deploy/kafka/kafka.sh) keeps records of
any age. A live join's output carries its event time as its Kafka timestamp, and the
tests replay event times from 2023: with the broker's former 24 h time limit,
its retention check (every 5 minutes) deleted such outputs, active segment included, at
a random moment of a test (docs/delivery.md, "Outputs of old event times deleted by the
test broker")."""

from __future__ import annotations

from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from tests.support import admin_client, create_topics, run, unique


async def topic_config(topic: str, names: list[str]) -> dict[str, str]:
    async with admin_client() as admin:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    # resources: (error_code, error_message, resource_type, resource_name, config_entries);
    # each entry starts with (name, value).
    entries = responses[0].resources[0][4]
    return {entry[0]: entry[1] for entry in entries if entry[0] in names}


def test_a_new_topic_keeps_records_of_any_age(kafka):
    """A topic created on the local broker has no time limit (``retention.ms`` -1) and a
    size limit per partition instead; this fails on a broker started with a time limit."""
    topic = unique("retention")
    run(create_topics([topic], partitions=1))
    config = run(topic_config(topic, ["retention.ms", "retention.bytes"]))
    assert config == {"retention.ms": "-1", "retention.bytes": "1073741824"}
