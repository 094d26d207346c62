"""streametl's own commands on the Faust command line (``streametl --help``)."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient

from app import app, settings
from app.kafka_security import client_options


@app.command()
async def create_topics(self) -> None:
    """Create every topic the app declares (what a worker does at start) and exit."""
    app.discover()
    from app.kafka_io import ensure_topics
    from app.topics import DECLARED

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, **client_options(settings))
    await admin.start()
    try:
        await ensure_topics(admin, DECLARED.values())
    finally:
        await admin.close()
    for spec in sorted(DECLARED.values(), key=lambda s: s.name):
        self.say(f"{spec.name}\tpartitions={spec.partitions}\tcompacted={spec.compacted}")


@app.command()
async def show_settings(self) -> None:
    """Print the effective settings (defaults overridden by STREAMETL_* variables);
    secrets are masked."""
    for name, value in settings.shown().items():
        self.say(f"STREAMETL_{name.upper()}={value}")
