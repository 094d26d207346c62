"""The one Faust app of streametl.

``faust -A app worker`` and ``streametl worker`` both find ``app`` here. Agents, tables
and web views live in their own packages and are found by autodiscovery, so importing
this module stays cheap and free of import cycles.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from app import api_auth, logs
from app import metrics as _metrics
from app import transport as _transport
from app.kafka_security import broker_credentials, check_connection, wait_for_broker
from app.settings import settings

# The consume path (app/transport.py) is selected by the broker URL scheme. It is the
# only one: every processor is a batch agent, which Faust's own consumer cannot serve.
_transport.install()
_metrics.install()


def _web_options() -> dict:
    options: dict = {"client_max_size": settings.produce_max_bytes + 65536}
    middlewares = []
    if _metrics.METRICS is not None:
        # First, so that requests the token check refuses are counted too.
        middlewares.append(_metrics.METRICS.middleware())
    tokens = api_auth.parse_tokens(settings.api_tokens)
    if tokens:
        middlewares.append(api_auth.middleware(tokens, settings.api_open_paths.split(",")))
    if middlewares:
        options["middlewares"] = middlewares
    return options


def _web_ssl_context() -> ssl.SSLContext | None:
    """HTTPS for the web server when a certificate is configured."""
    if not settings.web_ssl_certfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.web_ssl_certfile, settings.web_ssl_keyfile)
    return context


app = _transport.App(
    settings.app_id,
    broker=_transport.broker_url(settings.broker),
    store=settings.store,
    # One folder per app id: local table state of one app must never be read by another.
    datadir=str(Path(settings.data_dir) / settings.app_id),
    topic_partitions=settings.topic_partitions,
    topic_replication_factor=settings.topic_replication,
    # Topics are created by the app (explicitly, with partition counts).
    topic_allow_declare=True,
    web=f"{_transport.WEB_SCHEME}://",
    web_host=settings.web_host,
    web_bind=settings.web_host,
    web_port=settings.web_port,
    web_application_options=_web_options(),
    web_ssl_context=_web_ssl_context(),
    broker_credentials=broker_credentials(settings),
    broker_session_timeout=settings.session_timeout,
    # The delivery guarantee and the commit cadence (Settings.commit_options).
    **settings.commit_options(),
    broker_max_poll_records=settings.max_poll_records,
    consumer_max_fetch_size=settings.max_partition_fetch_bytes,
    producer_linger=settings.producer_linger,
    stream_buffer_maxsize=settings.stream_buffer_maxsize,
    consumer_auto_offset_reset="earliest",
    autodiscover=["tables", "agents", "web"],
    logging_config=logs.logging_config(settings.log_format),
    # Faust's table recovery, restarted when a rebalance interrupts it (app/transport.py).
    TableManager=_transport.TableManager,
    # One topic group number (transactional id) per copartitioned topic set (app/transport.py).
    PartitionAssignor=_transport.PartitionAssignor,
    origin="app",
)
app.stop_timeout = settings.stop_timeout
if settings.broker_wait > 0:
    app.start_checks.append(lambda: wait_for_broker(settings))
if settings.kafka_security_protocol != "PLAINTEXT":
    # A refused login or certificate stops the worker with the setting to fix, instead
    # of clients that retry for ever.
    app.start_checks.append(lambda: check_connection(settings))
app.topic_prefix = settings.topic_prefix

__all__ = ["app", "settings"]

# Our CLI commands must be registered before Faust parses the command line, for
# ``streametl`` and ``faust -A app`` alike; they import only ``app``.
from app import commands as _commands  # noqa: E402,F401
from app import gc_tuning as _gc_tuning  # noqa: E402,F401 - a start-up task
