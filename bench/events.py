"""The benchmark's event shape (~300-byte JSON click events over a key space) and how
scenarios send them."""

from __future__ import annotations

import asyncio
import random
import time

import orjson
from aiokafka import AIOKafkaProducer

from tests.support import kafka_options

ACTIONS = ("click", "view", "scroll", "purchase", "login")
COUNTRIES = ("DE", "FR", "US", "GB", "NL", "ES", "IT", "PL")


def make_event(i: int, keys: int, rng: random.Random, ts: float | None = None) -> dict:
    """One click event; ``sent_at`` (epoch seconds) lets consumers measure latency."""
    return {
        "event_id": f"e-{i:012d}",
        "user_id": f"u{rng.randrange(keys):05d}",
        "action": rng.choice(ACTIONS),
        "value": rng.randint(1, 100),
        "country": rng.choice(COUNTRIES),
        "session": f"s-{rng.randrange(1 << 30):09d}",
        "page": f"/products/{rng.randrange(5000)}/details",
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64) bench/1.0",
        "ts": ts if ts is not None else time.time(),
        "sent_at": time.time(),
    }


def make_payloads(n: int, keys: int = 10_000, seed: int = 7) -> list[dict]:
    """``n`` events with deterministic content (``sent_at`` is reset at send time)."""
    rng = random.Random(seed)
    return [make_event(i, keys, rng) for i in range(n)]


def encoded_size(event: dict) -> int:
    return len(orjson.dumps(event))


async def produce_events(bootstrap: str, topic: str, events: list[dict], rate: float = 0,
                         pace_every: int = 1, linger_ms: int | None = None) -> None:
    """Send events keyed by user_id; paced at ``rate``/s when given (then ``sent_at`` and
    ``ts`` are the send time), checking the pace every ``pace_every`` events.

    ``linger_ms``: default 5 for a backlog (full batches), 0 when paced. Why 0 there: a
    paced event's ``sent_at`` is taken before the producer holds it, so a linger would
    count the load generator's own batching wait in every latency sample (up to 5 ms);
    transform's latency producer does not linger either."""
    if linger_ms is None:
        linger_ms = 0 if rate else 5
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=linger_ms, **kafka_options(),
                                max_batch_size=512 * 1024)
    await producer.start()
    try:
        futures = []
        t0 = time.perf_counter()
        for i, e in enumerate(events):
            if rate and i % pace_every == 0:
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            if rate:
                e["sent_at"] = e["ts"] = time.time()
            futures.append(await producer.send(topic, orjson.dumps(e), key=e["user_id"].encode()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
