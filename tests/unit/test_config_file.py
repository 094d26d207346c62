"""The config file: a missing file the user named stops the worker; only the built-in
default may be absent (issue 17: the Docker image silently ran no pipelines)."""

from __future__ import annotations

import pytest

from app import config_file
from app.config_file import ConfigFileError


def test_a_named_config_file_that_does_not_exist_is_an_error(tmp_path):
    missing = tmp_path / "nowhere" / "pipelines.yaml"
    with pytest.raises(ConfigFileError, match="config file not found"):
        config_file.load_config.__wrapped__(str(missing))


def test_the_built_in_default_may_be_absent(tmp_path, monkeypatch):
    missing = tmp_path / "pipelines.yaml"
    monkeypatch.setattr(config_file, "DEFAULT_PIPELINES_FILE", str(missing))
    assert config_file.load_config.__wrapped__(str(missing)) == {}


def test_a_file_that_exists_is_read(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("pipelines: []\n")
    assert config_file.load_config.__wrapped__(str(path)) == {"pipelines": []}


def test_an_empty_name_means_no_config_file():
    assert config_file.load_config.__wrapped__("") == {}


def test_an_unquoted_on_key_stays_a_key_and_yaml_12_booleans():
    """YAML 1.1 reads an unquoted ``on`` as the boolean True: the join step's
    ``{op: join, on: order_id}`` lost its key field. The config loader reads YAML 1.2
    booleans (true/false only)."""
    from app.config_file import load_yaml

    data = load_yaml("steps: [{op: join, with: payments, on: order_id, within: 10m}]\nflag: true\nword: yes\n")
    assert data["steps"][0]["on"] == "order_id"
    assert data["flag"] is True and data["word"] == "yes"
