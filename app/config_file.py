"""The declarative config file (YAML or JSON) named by ``settings.pipelines_file``.

Each area reads its own top-level section (``pipelines``, ``windows``, ``patterns``)
and validates it itself; this module only loads the file once.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import yaml

from app.settings import DEFAULT_PIPELINES_FILE, settings


class ConfigFileError(ValueError):
    """The config file is missing, unreadable or not a mapping."""


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only ``true``/``false``. Why: under
    YAML 1.1 an unquoted ``on`` (the join step's key field, ``{op: join, on: order_id}``)
    is the boolean True, and so are ``yes``, ``no``, ``off``; the step then had no ``on``."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml(text: str) -> Any:
    """Parse config text as the worker does (``ConfigLoader``)."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass


@functools.cache
def load_config(path: str | None = None) -> dict[str, Any]:
    """The parsed config file as a dict.

    A missing file is an error (a worker that silently runs no pipelines is worse than
    one that refuses to start), except the built-in default, which an installed package
    does not ship."""
    name = settings.pipelines_file if path is None else path
    if not name:  # STREAMETL_PIPELINES_FILE= : nothing declared
        return {}
    file = Path(name)
    if not file.exists():
        if str(file) == DEFAULT_PIPELINES_FILE:
            return {}
        raise ConfigFileError(f"{file}: config file not found (set by STREAMETL_PIPELINES_FILE)")
    try:
        data = load_yaml(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{file}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigFileError(f"{file}: top level must be a mapping of sections")
    return data


def section(name: str) -> Any:
    """One top-level section of the config file, or None."""
    return load_config().get(name)
