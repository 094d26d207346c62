"""POST /api/v1/produce: JSON messages into a Kafka topic, acknowledged (acks=all)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from app import settings
from app.kafka_io import OutgoingMessage, kafka_io
from web.common import ApiError, ApiView, endpoint, invalid

#: Kafka's legal topic names: 1-249 of [a-zA-Z0-9._-], not "." or "..".
TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


@dataclass(frozen=True)
class ProduceRequest:
    """A validated produce body."""

    topic: str
    messages: list[OutgoingMessage]


def parse_produce(body: dict[str, Any]) -> ProduceRequest:
    """Validate a produce body and encode its messages; ApiError names any problem."""
    unknown = set(body) - {"topic", "messages", "key_field", "headers"}
    if unknown:
        raise invalid(f"unknown fields: {sorted(unknown)}", {"fields": sorted(unknown)})
    topic = body.get("topic")
    if not isinstance(topic, str) or not TOPIC_NAME.match(topic) or topic in {".", ".."}:
        raise invalid(
            "topic must be a Kafka topic name: 1-249 characters of letters, digits, '.', '_', '-'",
            {"field": "topic", "value": topic},
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list of JSON objects", {"field": "messages"})
    if len(messages) > settings.produce_max_messages:
        raise ApiError(
            413,
            "too_many_messages",
            f"{len(messages)} messages; the limit is {settings.produce_max_messages} per request",
            {"limit_messages": settings.produce_max_messages},
        )
    key_field = body.get("key_field")
    if key_field is not None and (not isinstance(key_field, str) or not key_field):
        raise invalid("key_field must be a non-empty string", {"field": "key_field"})
    headers_in = body.get("headers")
    if headers_in is None:
        headers_in = {}
    if not isinstance(headers_in, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers_in.items()
    ):
        raise invalid("headers must be an object of string to string", {"field": "headers"})
    headers = tuple((k, v.encode()) for k, v in headers_in.items())

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


@endpoint("/api/v1/produce", "Produce JSON messages to a topic; 200 once the broker acknowledged all")
class Produce(ApiView):
    async def post(self, request: Any) -> Any:
        body = await self.read_json_object(request)
        produce = parse_produce(body)
        if not kafka_io.ready.is_set():
            raise ApiError(503, "not_ready", "the worker is still starting; retry shortly")
        partitions = await kafka_io.partition_count(produce.topic)
        if partitions is None:
            if not settings.auto_create_topics:
                raise ApiError(
                    404,
                    "unknown_topic",
                    f"topic {produce.topic!r} does not exist and auto-creation is off",
                    {"topic": produce.topic},
                )
            partitions = await kafka_io.create_topic(produce.topic)
        delivered = await kafka_io.send_batch(produce.topic, produce.messages, partitions)
        return self.reply(
            {
                "topic": produce.topic,
                "count": len(delivered),
                "results": [{"partition": d.partition, "offset": d.offset} for d in delivered],
            }
        )
