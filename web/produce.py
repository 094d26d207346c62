"""POST /api/v1/produce: JSON messages into a Kafka topic, acknowledged (acks=all)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from app import settings
from app.kafka_io import OutgoingMessage, kafka_io
from app.topics import DECLARED
from web.api_models import ProduceBody, ProduceResult
from web.common import ApiError, ApiView, Operation, endpoint, invalid


@dataclass(frozen=True)
class ProduceRequest:
    """A validated produce body."""

    topic: str
    messages: list[OutgoingMessage]


def parse_produce(body: dict[str, Any]) -> ProduceRequest:
    """Validate a produce body and encode its messages; ApiError names any problem.

    The model checks the body's fields; each message is checked here, in the loop that
    encodes it (a model of every message would double the cost of this hot path)."""
    req = ProduceBody.parse_body(body)
    topic, messages, key_field = req.topic, req.messages, req.key_field
    headers = tuple((k, v.encode()) for k, v in (req.headers or {}).items())

    encoded: list[OutgoingMessage] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(
                f"messages[{index}] must be a JSON object, not {type(message).__name__}",
                {"index": index},
            )
        key: bytes | None = None
        if key_field is not None:
            if key_field not in message or message[key_field] is None:
                raise invalid(
                    f"messages[{index}] has no key field {key_field!r}",
                    {"index": index, "field": key_field},
                )
            raw_key = message[key_field]
            key = (raw_key if isinstance(raw_key, str) else orjson.dumps(raw_key).decode()).encode()
        encoded.append(OutgoingMessage(key, orjson.dumps(message), headers))
    return ProduceRequest(topic, encoded)


async def topic_partitions(name: str) -> tuple[str, int | None]:
    """The Kafka topic a produce request means, and its partition count (None: unknown).

    A logical name of one of the app's own topics (``events`` while
    ``STREAMETL_TOPIC_PREFIX`` is set) means that topic, as it does everywhere in the
    config: the README's examples then work under any prefix. Any other name is the
    Kafka topic itself."""
    app_topic = settings.topic(name)
    topic = app_topic if app_topic in DECLARED else name
    return topic, await kafka_io.partition_count(topic)


@endpoint("/api/v1/produce", "Produce JSON messages to a topic; 200 once the broker acknowledged all",
          post=Operation(ProduceResult, body=ProduceBody))
class Produce(ApiView):
    async def post(self, request: Any) -> Any:
        body = await self.read_json_object(request)
        produce = parse_produce(body)
        if not kafka_io.ready.is_set():
            raise ApiError(503, "not_ready", "the worker is still starting; retry shortly")
        topic, partitions = await topic_partitions(produce.topic)
        if partitions is None:
            if not settings.auto_create_topics:
                raise ApiError(
                    404,
                    "unknown_topic",
                    f"topic {topic!r} does not exist and auto-creation is off",
                    {"topic": topic},
                )
            partitions = await kafka_io.create_topic(topic)
        delivered = await kafka_io.send_batch(topic, produce.messages, partitions)
        return self.reply(
            {
                "topic": topic,
                "count": len(delivered),
                "results": [{"partition": d.partition, "offset": d.offset} for d in delivered],
            }
        )
