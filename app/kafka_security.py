"""Kafka connection security from Settings: one description of TLS and SASL that every
client of the app uses.

Faust's consumer, producers, transactional producers and admin client get it as
``broker_credentials``; streametl's own clients (the API producer and admin client, the
reference and pattern readers) get the same options through :func:`client_options`,
which is Faust's own translation of those credentials into aiokafka arguments.
:func:`check_connection` runs at worker start so that a wrong password or an untrusted
CA stops the worker with a message naming the setting, instead of a retry loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from typing import Any

import faust
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaConnectionError, KafkaError
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from app.settings import Settings

log = logging.getLogger(__name__)


class KafkaSecurityError(RuntimeError):
    """The broker refused this worker's TLS or SASL settings."""


@functools.cache
def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The client TLS context, or None when the protocol has no TLS. One per settings:
    every client shares it (the alerts view builds a consumer per request), instead of
    reading the CA and key files again for each."""
    if settings.kafka_security_protocol not in {"SSL", "SASL_SSL"}:
        return None
    context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
    context.check_hostname = settings.kafka_ssl_check_hostname
    if settings.kafka_ssl_certfile:
        context.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile)
    return context


def broker_credentials(settings: Settings) -> Any:
    """Faust's ``broker_credentials`` for the settings (None for PLAINTEXT)."""
    protocol = settings.kafka_security_protocol
    context = ssl_context(settings)
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(username=settings.kafka_sasl_username,
                                     password=settings.kafka_sasl_password,
                                     ssl_context=context, mechanism=settings.kafka_sasl_mechanism)
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    return None


def client_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments that give an aiokafka client the app's connection security."""
    return dict(credentials_to_aiokafka_auth(broker_credentials(settings)))


def explain(settings: Settings, exc: BaseException) -> str:
    """What a connection failure says about the settings, naming them."""
    chain = []
    cause: BaseException | None = exc
    while cause is not None and len(chain) < 5:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = " | ".join(f"{type(e).__name__}: {e}" for e in chain)
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in chain) or "CERTIFICATE_VERIFY_FAILED" in text:
        return ("the broker's TLS certificate is not trusted: check STREAMETL_KAFKA_SSL_CAFILE "
                f"(and STREAMETL_KAFKA_SSL_CHECK_HOSTNAME) ({text})")
    if any(isinstance(e, ssl.SSLError) for e in chain):
        return f"TLS with the broker failed: check STREAMETL_KAFKA_SECURITY_PROTOCOL and the STREAMETL_KAFKA_SSL_* files ({text})"
    if "Authentication" in text or "SaslAuthentication" in text or "authentication" in text:
        return ("the broker refused the SASL login: check STREAMETL_KAFKA_SASL_USERNAME, "
                f"STREAMETL_KAFKA_SASL_PASSWORD and STREAMETL_KAFKA_SASL_MECHANISM ({text})")
    return (f"could not reach the broker at {settings.bootstrap_servers} with "
            f"STREAMETL_KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol} ({text})")


async def check_connection(settings: Settings, timeout: float = 30.0) -> None:
    """Connect once with the app's security settings and read the cluster's metadata;
    :class:`KafkaSecurityError` naming the setting when the broker refuses them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers,
                                request_timeout_ms=int(timeout * 1000), **client_options(settings))
    try:
        await asyncio.wait_for(admin.start(), timeout)
        await asyncio.wait_for(admin.describe_cluster(), timeout)
    except (KafkaError, KafkaConnectionError, OSError, ssl.SSLError, TimeoutError) as exc:
        # The client only says "Unable to bootstrap"; one direct connection says why.
        raise KafkaSecurityError(explain(settings, await probe(settings, timeout) or exc)) from None
    finally:
        await admin.close()


async def wait_for_broker(settings: Settings, attempt_timeout: float = 5.0) -> None:
    """A start check: wait, up to ``settings.broker_wait`` seconds, until one bootstrap
    server accepts a connection; then the worker starts as usual (and fails as before if
    the broker is still away).

    Why (issue 23): a worker restarted while its broker restarted exited at once
    ("Unable to bootstrap"), and its supervisor restarted it every few seconds until the
    broker was back (six exits in one chaos run). Kafka's own clients wait instead."""
    deadline = asyncio.get_running_loop().time() + settings.broker_wait
    waited = False
    while True:
        error = await unreachable(settings, attempt_timeout)
        if error is None:
            if waited:
                log.info("The broker at %s is reachable; starting", settings.bootstrap_servers)
            return
        if asyncio.get_running_loop().time() >= deadline:
            return  # the client's own error follows, with its explanation
        if not waited:
            log.warning("No broker at %s (%r); waiting up to %.0f s for it", settings.bootstrap_servers,
                        error, settings.broker_wait)
            waited = True
        await asyncio.sleep(1.0)


async def unreachable(settings: Settings, timeout: float) -> BaseException | None:
    """None when one bootstrap server accepts a TCP connection, else the last error.
    Only reachability: a refused login or certificate is ``check_connection``'s to
    explain (waiting would only delay that)."""
    error: BaseException | None = None
    for server in settings.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
        except (OSError, TimeoutError) as exc:
            error = exc
            continue
        writer.close()
        return None
    return error


async def probe(settings: Settings, timeout: float) -> BaseException | None:
    """The error of one direct connection to the first bootstrap server, if any."""
    host, _, port = settings.bootstrap_servers.split(",")[0].rpartition(":")
    try:
        conn = await asyncio.wait_for(
            create_conn(host, int(port), request_timeout_ms=int(timeout * 1000), **client_options(settings)),
            timeout)
    except Exception as exc:  # noqa: BLE001 - whatever it is, it is the explanation
        return exc
    conn.close()
    return None


__all__ = ["KafkaSecurityError", "broker_credentials", "check_connection", "client_options", "ssl_context",
           "wait_for_broker"]
