"""Settings parse the environment strictly; the Docker route agrees with them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from app.settings import PREFIX, Settings, SettingsError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_match_the_readme():
    s = Settings.from_env({})
    assert s.broker == "kafka://127.0.0.1:9092"
    assert s.store == "rocksdb://"
    assert s.web_port == 6066
    assert s.processing_guarantee == "at_least_once"


def test_environment_overrides_are_typed():
    s = Settings.from_env(
        {"STREAMETL_WEB_PORT": "7000", "STREAMETL_AUTO_CREATE_TOPICS": "yes",
         "STREAMETL_BATCH_WITHIN": "0.5", "STREAMETL_TOPIC_PREFIX": "x."}
    )
    assert (s.web_port, s.auto_create_topics, s.batch_within) == (7000, True, 0.5)
    assert s.topic("events") == "x.events"


@pytest.mark.parametrize(
    "env",
    [{"STREAMETL_WEB_PORT": "http"}, {"STREAMETL_PROCESSING_GUARANTEE": "maybe"},
     {"STREAMETL_AUTO_CREATE_TOPICS": "perhaps"}, {"STREAMETL_TOPIC_PARTITIONS": "0"}],
)
def test_bad_values_are_refused_with_the_variable_named(env):
    with pytest.raises(SettingsError):
        Settings.from_env(env)


def test_bootstrap_servers_strip_the_scheme():
    s = Settings.from_env({"STREAMETL_BROKER": "kafka://a:1;kafka://b:2"})
    assert s.bootstrap_servers == "a:1,b:2"


def test_compose_file_matches_the_settings():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"kafka", "worker"}
    kafka, worker = services["kafka"], services["worker"]
    assert kafka["image"].startswith("apache/kafka:4.")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert worker["build"] == "."

    env = worker["environment"]
    field_names = {f.name for f in dataclasses.fields(Settings)}
    for name in env:
        assert name.startswith(PREFIX), name
        assert name[len(PREFIX):].lower() in field_names, f"{name} is not a setting"
    settings = Settings.from_env(env)  # every value parses
    # the worker reaches Kafka on the in-network listener the broker advertises
    advertised = kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert f"PLAINTEXT://{settings.bootstrap_servers}" in advertised
    # the published port range maps onto the port the worker serves
    assert worker["ports"] == [f"6066-6075:{settings.web_port}"]
    assert settings.web_host == "0.0.0.0"
    # scaling needs no fixed container name or fixed host port
    assert "container_name" not in worker


def test_dockerfile_installs_the_package_and_runs_the_worker():
    text = (REPO / "Dockerfile").read_text()
    assert "pip install" in text
    assert 'CMD ["streametl", "worker"' in text


def test_commit_every_reaches_faust_and_refuses_nonsense():
    import pytest

    from app import app
    from app.settings import Settings, SettingsError

    assert app.conf.broker_commit_every == Settings().commit_every == 100_000
    assert Settings.from_env({"STREAMETL_COMMIT_EVERY": "50000"}).commit_every == 50_000
    with pytest.raises(SettingsError, match="commit_every"):
        Settings(commit_every=0).validate()


def test_commit_interval_follows_the_guarantee_unless_set():
    from app import app, settings

    # 0 (the default): Kafka Streams' way, a longer interval under at_least_once.
    assert Settings.from_env({}).commit_interval_seconds() == 3.0
    assert Settings.from_env({"STREAMETL_PROCESSING_GUARANTEE": "exactly_once"}).commit_interval_seconds() == 1.0
    # A value given wins under either guarantee.
    assert Settings.from_env({"STREAMETL_COMMIT_INTERVAL": "0.2"}).commit_interval_seconds() == 0.2
    assert Settings.from_env({"STREAMETL_COMMIT_INTERVAL": "5",
                              "STREAMETL_PROCESSING_GUARANTEE": "exactly_once"}).commit_interval_seconds() == 5.0
    with pytest.raises(SettingsError, match="commit_interval"):
        Settings.from_env({"STREAMETL_COMMIT_INTERVAL": "-1"})
    assert app.conf.broker_commit_interval == settings.commit_interval_seconds()


def test_only_settings_and_the_commit_module_name_the_guarantee():
    """Issue 18: the delivery guarantee has one owner. Outside app/settings.py (which
    reads it and builds the Faust app's commit options, ``Settings.commit_options``)
    and app/commit.py (which decides everything else from it), no module of the worker
    names ``processing_guarantee``; app/__init__.py used to pass it to Faust itself."""
    from pathlib import Path

    from app import app, settings

    repo = Path(__file__).resolve().parents[2]
    owners = {repo / "app" / "settings.py", repo / "app" / "commit.py"}
    found = [str(path.relative_to(repo))
             for package in ("app", "agents", "tables", "web", "operators")
             for path in sorted((repo / package).rglob("*.py"))
             if path not in owners and "processing_guarantee" in path.read_text()]
    assert found == []
    assert app.conf.processing_guarantee.value == settings.processing_guarantee
