"""The benchmark's event shape: ~300-byte JSON click events over a key space."""

from __future__ import annotations

import random
import time

import orjson

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
