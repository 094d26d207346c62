"""The one Settings object. Read from the environment (prefix ``STREAMETL_``) once.

Nothing else in the project reads ``os.environ``: every knob a user can turn is a
field here, with its default and the type it is parsed to.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

PREFIX = "STREAMETL_"
REPO_ROOT = Path(__file__).resolve().parent.parent
#: The sample config of a source checkout; the only config file that may be absent
#: (an installed package has none).
DEFAULT_PIPELINES_FILE = str(REPO_ROOT / "config" / "pipelines.yaml")


class SettingsError(ValueError):
    """An environment variable could not be parsed into its setting."""


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {raw!r}")


_PARSERS = {"int": int, "float": float, "bool": _parse_bool, "str": str}

#: Settings that are secrets: readable from ``STREAMETL_<NAME>_FILE``, never printed.
SECRETS = frozenset({"kafka_sasl_password", "api_tokens"})
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class Settings:
    """Every configurable value of streametl; ``STREAMETL_<FIELD>`` overrides each."""

    # Identity and cluster
    app_id: str = "streametl"
    broker: str = "kafka://127.0.0.1:9092"
    store: str = "rocksdb://"
    data_dir: str = str(REPO_ROOT / ".data")
    # Prefix for every topic the app owns (events, dlq, alerts, ...). Tests use it to
    # give each run its own topics on a shared broker.
    topic_prefix: str = ""
    topic_partitions: int = 4
    topic_replication: int = 1
    processing_guarantee: str = "at_least_once"  # or exactly_once
    # Web
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    # POST /api/v1/produce limits
    produce_max_messages: int = 10_000
    produce_max_bytes: int = 8 * 1024 * 1024
    auto_create_topics: bool = False
    # Stream processing
    # Seconds between offset commits, and so between the write-back flushes of window
    # and pattern state that precede each commit. 0 = chosen by processing_guarantee,
    # as Kafka Streams chooses its commit.interval.ms: 3.0 under at_least_once (Faust's
    # own default is 2.8), 1.0 under exactly_once, where each commit also ends a
    # transaction and so decides how soon read_committed readers see outputs.
    commit_interval: float = 0.0
    # Also commit after this many acked records (Faust's broker_commit_every), besides
    # every commit_interval seconds. Each commit flushes the write-back caches of windows
    # and patterns (one state write per dirty key), so commits by count cost writes: with
    # Faust's 10,000, a 35k events/s window worker flushed every 0.3 s and wrote 85-92k
    # states per 300k events; with commits by time it writes 46-49k (docs/windows.md).
    # 100,000 only bounds what a crash repeats at rates a worker does not reach today.
    commit_every: int = 100_000
    batch_max: int = 2000
    batch_within: float = 0.02
    stream_buffer_maxsize: int = 16384
    max_poll_records: int = 5000
    # Run Faust's aiokafka consumer in the worker's event loop instead of a thread of its
    # own (app/transport.py, FastConsumerThread): fetches are no longer handed between
    # two loops, which was most of a live stream's wait between batches.
    consumer_in_loop: bool = True
    # Static group membership (KIP-345): the worker's identity in its consumer group. A
    # worker that restarts with the same identity (and the same topics) within the
    # session timeout gets its partitions back at once, without a rebalance (the group
    # would otherwise wait out the dead member's session). Empty = derived,
    # "<app_id>.<hostname>.<web_port>": a worker is "the same" when it runs on the same
    # host and serves the same web port (one process per port per host; its data dir
    # goes with it). "off" = dynamic membership (Faust's). A value set here must be
    # unique per worker: the broker fences the older of two live workers sharing it.
    # The consumer's group.instance.id is this plus a digest of its topics
    # (app/transport.py: group_instance_id).
    group_instance_id: str = ""
    # Consumer group session timeout (seconds): how long the group waits for a member
    # that stopped heartbeating before its partitions move (Kafka Streams' default 45 s;
    # Faust's 60 s). A restart with static membership does not wait for it.
    session_timeout: float = 45.0
    # Longest time the broker parks a fetch with no new data (Faust hard-codes 1500 ms;
    # parked fetches also hold back partitions that have data: app/transport.py).
    fetch_max_wait_ms: int = 100
    # Most bytes one fetch returns per partition (Faust's default is 1 MiB: a backlog
    # then takes more fetch round trips than records per poll need).
    max_partition_fetch_bytes: int = 8 * 1024 * 1024
    # Faust producer linger (seconds) for changelog/sink sends; 0 = Faust's default. A few
    # ms turns one produce request per table write into one per batch (pattern-detect).
    producer_linger: float = 0.005
    # Freeze the worker's start-up objects so garbage collections never walk them again
    # (app/gc_tuning.py: full collections of the whole heap were the consume path's stalls).
    gc_freeze: bool = True
    # Collector thresholds of a worker (gen0,gen1,gen2; empty = Python's 700,10,10):
    # fewer, larger young passes (app/gc_tuning.py).
    gc_thresholds: str = "50000,20,100"
    # The bare counting agent of the consume benchmark (agents/passthrough.py); off in
    # production so it neither subscribes nor creates its topic.
    passthrough_enabled: bool = False
    # batch (the batch delivery path, app/batches.py), take (Faust stream batches of
    # batch_max), each (Faust, per event), forward (batch path, copy to passthrough.out)
    # or forward-stream (the same copy through a Faust stream)
    passthrough_mode: str = "batch"
    # Window aggregation: one write-back flush per fetched batch (at most
    # max_poll_records); this interval only enters the window runner's rate accounting.
    window_flush_interval: float = 0.25
    # Pattern engine: decoded states of recently matched keys kept in memory, at most
    # this many keys (0 = off; tables/patterns.py StateCache).
    pattern_state_cache: int = 50000
    # Seconds a graceful stop (SIGTERM, Ctrl-C) may take before the worker exits without
    # finishing it (0 = no limit). Nothing is lost either way: what was not committed is
    # processed again after a restart, or its transaction is aborted under exactly_once.
    stop_timeout: float = 8.0
    # Seconds a starting worker waits for an unreachable broker (a broker restart)
    # before it gives up and exits (0: it does not wait).
    broker_wait: float = 120.0
    # Local table state (tables/local_state.py). A table partition folder this worker
    # neither owns nor keeps as a standby is deleted once unwritten for this many
    # seconds (Kafka Streams' state.cleanup.delay.ms, 10 min). At start, a folder is
    # kept only if it caught up with its changelog less than local_state_max_age
    # seconds ago: a compacted changelog drops a deletion's tombstone after its
    # delete.retention.ms (Kafka's default 24 h), and a folder older than that would
    # keep the deleted key for ever. Keep it below the changelogs' delete.retention.ms.
    state_cleanup_delay: float = 600.0
    local_state_max_age: float = 43200.0
    # Declarative pipelines and patterns
    # A file named here must exist; only the default may be absent (then nothing runs).
    pipelines_file: str = DEFAULT_PIPELINES_FILE
    # Logging
    log_level: str = "info"
    # text (Faust's lines) or json (one JSON object per line: app/logs.py)
    log_format: str = "text"
    # Observability (app/metrics.py, app/cluster.py): GET /metrics, the per-batch timing
    # histograms, the HTTP middleware and the cluster status that GET /api/v1/cluster
    # and the cluster totals of /api/v1/pipelines and /api/v1/windows read. false turns
    # all of it off (those endpoints then answer 404), e.g. to measure what it costs.
    metrics: bool = True
    # Seconds between two status records of a worker on the cluster-status topic, and
    # age after which a worker's last record no longer counts (it stopped or hangs).
    cluster_status_interval: float = 2.0
    cluster_status_timeout: float = 10.0
    # Kafka connection security, for every client of the app (Faust's consumer,
    # producers and admin client, changelogs, streametl's own readers and producer):
    # PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (app/kafka_security.py).
    kafka_security_protocol: str = "PLAINTEXT"
    # TLS: the CA bundle that signs the brokers' certificates (empty: the system's),
    # a client certificate and key for mutual TLS, and the hostname check.
    kafka_ssl_cafile: str = ""
    kafka_ssl_certfile: str = ""
    kafka_ssl_keyfile: str = ""
    kafka_ssl_check_hostname: bool = True
    # SASL: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (a secret: _FILE works, never shown).
    kafka_sasl_mechanism: str = "PLAIN"
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = field(default="", repr=False)
    # HTTP API authentication (web/auth.py): off while empty. Comma- or line-separated
    # `role:token` entries; roles read (GETs) < write (produce, process, aggregate) <
    # admin (patterns, reference data, everything). A secret: _FILE works, never shown.
    api_tokens: str = field(default="", repr=False)
    # Paths that stay open when tokens are set (comma-separated; empty: none).
    api_open_paths: str = "/health,/metrics"
    # HTTPS for the web server: certificate chain and key (PEM). Both or neither.
    web_ssl_certfile: str = ""
    web_ssl_keyfile: str = ""
    # The CA bundle that verifies the other workers' HTTPS certificates when a request
    # is forwarded to the partition owner (POST /api/v1/aggregate). Empty: the
    # kafka_ssl_cafile if set (one CA signs both in most deployments), else the system's.
    web_peer_cafile: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build Settings from ``STREAMETL_*`` variables; unknown ones are ignored.

        A secret may instead come from a file named by ``STREAMETL_<NAME>_FILE`` (the
        Docker and Kubernetes secrets convention); its content, without the final
        newline, is the value."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            secret_file = env.get(PREFIX + f.name.upper() + "_FILE")
            if f.name in SECRETS and secret_file and raw is None:
                try:
                    raw = Path(secret_file).read_text().rstrip("\r\n")
                except OSError as exc:
                    raise SettingsError(f"{PREFIX}{f.name.upper()}_FILE={secret_file!r}: {exc.strerror}") from None
            if raw is None:
                continue
            parser = _PARSERS[f.type if isinstance(f.type, str) else f.type.__name__]
            try:
                values[f.name] = parser(raw)
            except ValueError as exc:
                raise SettingsError(f"{PREFIX}{f.name.upper()}={raw!r}: {exc}") from exc
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Refuse settings that can only fail later, and say which one is wrong."""
        self.gc_threshold_values()  # raises SettingsError when malformed
        if self.processing_guarantee not in {"at_least_once", "exactly_once"}:
            raise SettingsError(
                "processing_guarantee must be at_least_once or exactly_once, "
                f"not {self.processing_guarantee!r}"
            )
        if self.log_format not in ("text", "json"):
            raise SettingsError(f"log_format must be text or json, not {self.log_format!r}")
        if self.commit_interval < 0:
            raise SettingsError("commit_interval must be >= 0 (0: chosen by processing_guarantee)")
        if self.broker_wait < 0:
            raise SettingsError("broker_wait must be >= 0 (0: no wait)")
        if self.state_cleanup_delay <= 0 or self.local_state_max_age <= 0:
            raise SettingsError("state_cleanup_delay and local_state_max_age must be > 0")
        if self.stop_timeout < 0:
            raise SettingsError("stop_timeout must be >= 0 (0: no limit)")
        if self.commit_every < 1:
            raise SettingsError("commit_every must be >= 1")
        if not 0 < self.cluster_status_interval < self.cluster_status_timeout:
            raise SettingsError("cluster_status_interval must be > 0 and below cluster_status_timeout")
        if self.topic_partitions < 1:
            raise SettingsError("topic_partitions must be >= 1")
        if self.session_timeout < 6:
            raise SettingsError("session_timeout must be >= 6 seconds (the broker's minimum; heartbeats every 3 s)")
        if not 0 < self.web_port < 65536:
            raise SettingsError("web_port must be a TCP port")
        if self.kafka_security_protocol not in SECURITY_PROTOCOLS:
            raise SettingsError(f"kafka_security_protocol must be one of {', '.join(SECURITY_PROTOCOLS)}, "
                                f"not {self.kafka_security_protocol!r}")
        if self.kafka_security_protocol.startswith("SASL"):
            if self.kafka_sasl_mechanism not in SASL_MECHANISMS:
                raise SettingsError(f"kafka_sasl_mechanism must be one of {', '.join(SASL_MECHANISMS)}, "
                                    f"not {self.kafka_sasl_mechanism!r}")
            if not self.kafka_sasl_username or not self.kafka_sasl_password:
                raise SettingsError(f"kafka_security_protocol={self.kafka_security_protocol} needs "
                                    "kafka_sasl_username and kafka_sasl_password")
        if bool(self.kafka_ssl_certfile) != bool(self.kafka_ssl_keyfile):
            raise SettingsError("kafka_ssl_certfile and kafka_ssl_keyfile go together (mutual TLS)")
        if bool(self.web_ssl_certfile) != bool(self.web_ssl_keyfile):
            raise SettingsError("web_ssl_certfile and web_ssl_keyfile go together (HTTPS)")
        for name in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile",
                     "web_ssl_certfile", "web_ssl_keyfile", "web_peer_cafile"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise SettingsError(f"{name}: no such file: {path}")

    def commit_interval_seconds(self) -> float:
        """``commit_interval``, or when it is 0 the default of the processing guarantee.

        Why longer under at_least_once: a pattern worker writes each changed key's state
        once per commit; at 1 s its 10,000 keys were written about every second event
        (encode, changelog record, RocksDB), ~20 % of its handler; at 3 s a third as
        often (docs/patterns.md, session 9). What it costs: after a crash up to that
        much input is processed again (at_least_once repeats, it never loses)."""
        if self.commit_interval > 0:
            return self.commit_interval
        return 1.0 if self.processing_guarantee == "exactly_once" else 3.0

    def commit_options(self) -> dict[str, Any]:
        """The Faust app's delivery and commit options, built here from the guarantee so
        that nothing else reads it (``app.commit`` decides everything else from it)."""
        return {
            "processing_guarantee": self.processing_guarantee,
            "broker_commit_interval": self.commit_interval_seconds(),
            "broker_commit_every": self.commit_every,
        }

    def topic(self, name: str) -> str:
        """The Kafka topic name of one of the app's own logical topics."""
        return f"{self.topic_prefix}{name}"

    @property
    def bootstrap_servers(self) -> str:
        """The broker URL without Faust's ``kafka://`` scheme, for plain clients."""
        return ",".join(
            part.split("://", 1)[-1] for part in self.broker.split(";") if part.strip()
        )

    def gc_threshold_values(self) -> tuple[int, int, int] | None:
        """``gc_thresholds`` as three positive ints, or None for Python's defaults."""
        if not self.gc_thresholds.strip():
            return None
        try:
            values = tuple(int(v) for v in self.gc_thresholds.split(","))
        except ValueError:
            values = ()
        if len(values) != 3 or min(values) <= 0:
            raise SettingsError(f"gc_thresholds must be three positive integers like '50000,20,100', not {self.gc_thresholds!r}")
        return values  # type: ignore[return-value]

    def shown(self) -> dict[str, Any]:
        """Every setting by field name, secrets masked (``show-settings``, logs)."""
        return {f.name: ("****" if f.name in SECRETS and getattr(self, f.name) else getattr(self, f.name))
                for f in fields(self)}

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests and benchmarks)."""
        return dataclasses.replace(self, **changes)


settings = Settings.from_env()

__all__ = ["DEFAULT_PIPELINES_FILE", "Settings", "SettingsError", "settings", "field"]
