"""The one Faust app of streametl.

``faust -A app worker`` and ``streametl worker`` both find ``app`` here. Agents, tables
and web views live in their own packages and are found by autodiscovery, so importing
this module stays cheap and free of import cycles.
"""

from __future__ import annotations

from pathlib import Path

import faust

from app import transport as _transport
from app.settings import settings

# The fast consume path (app/transport.py) is selected by the broker URL scheme.
_transport.install()

app = faust.App(
    settings.app_id,
    broker=_transport.broker_url(settings.broker, settings.fast_consumer),
    store=settings.store,
    # One folder per app id: local table state of one app must never be read by another.
    datadir=str(Path(settings.data_dir) / settings.app_id),
    processing_guarantee=settings.processing_guarantee,
    topic_partitions=settings.topic_partitions,
    topic_replication_factor=settings.topic_replication,
    # Topics are created by the app (explicitly, with partition counts).
    topic_allow_declare=True,
    web_host=settings.web_host,
    web_bind=settings.web_host,
    web_port=settings.web_port,
    web_application_options={"client_max_size": settings.produce_max_bytes + 65536},
    broker_commit_interval=settings.commit_interval_seconds(),
    broker_commit_every=settings.commit_every,
    broker_max_poll_records=settings.max_poll_records,
    consumer_max_fetch_size=settings.max_partition_fetch_bytes,
    producer_linger=settings.producer_linger,
    stream_buffer_maxsize=settings.stream_buffer_maxsize,
    consumer_auto_offset_reset="earliest",
    # agent.ask() (POST /api/v1/aggregate) needs this worker's reply topic; the broker
    # does not auto-create topics.
    reply_create_topic=True,
    autodiscover=["tables", "agents", "web"],
    # Faust's table recovery, restarted when a rebalance interrupts it (app/transport.py).
    TableManager=_transport.TableManager,
    origin="app",
)



def _refuse_broken_module(name: str) -> None:
    """Faust only logs a warning when an autodiscovered module fails to import, and the
    worker then runs without that module's agents or views. A broken module or an
    invalid config file must stop the worker with its error instead."""
    raise  # noqa: PLE0704 - called by venusian inside its ``except`` block


app._on_autodiscovery_error = _refuse_broken_module  # type: ignore[method-assign]

__all__ = ["app", "settings"]

# Our CLI commands must be registered before Faust parses the command line, for
# ``streametl`` and ``faust -A app`` alike; they import only ``app``.
from app import commands as _commands  # noqa: E402,F401
from app import gc_tuning as _gc_tuning  # noqa: E402,F401 - a start-up task
