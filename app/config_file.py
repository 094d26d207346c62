"""The declarative config file (YAML or JSON) named by ``settings.pipelines_file``.

Each area reads its own top-level section (``pipelines``, ``windows``, ``patterns``)
and validates it itself; this module only loads the file once.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

from app.settings import DEFAULT_PIPELINES_FILE, settings


class ConfigFileError(ValueError):
    """The config file is missing, unreadable or not a mapping."""


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
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{file}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigFileError(f"{file}: top level must be a mapping of sections")
    return data


def section(name: str) -> Any:
    """One top-level section of the config file, or None."""
    return load_config().get(name)
