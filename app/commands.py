"""streametl's own commands on the Faust command line (``streametl --help``)."""

from __future__ import annotations

import sys

from aiokafka.admin import AIOKafkaAdminClient
from faust.cli import argument

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


@app.command(argument("file"))
async def check_config(self, file: str) -> None:
    """Validate a config file (pipelines, windows, patterns) with the checks a worker
    runs at start; print each error with its path in the file; exit 1 on errors."""
    from app.check_config import check_config as check
    from app.check_config import summary

    errors = check(file)
    for error in errors:
        print(error, file=sys.stderr)
    if errors:
        print(f"{file}: {len(errors)} error(s)", file=sys.stderr)
        raise SystemExit(1)
    self.say(summary(file))
