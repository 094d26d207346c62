"""``streametl check-config FILE``: validate a config file with the validators a worker
runs at start, and name every error by its path in the file.

Each entry of each section is checked on its own, so one run reports an error in every
bad entry (a worker stops at the first); then each section is checked whole, for what
spans entries (a name used twice). The messages are the validators' own.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from app.config_file import load_yaml
from app.db_sinks import SinkConfigError, parse_sink, parse_sinks
from app.patterns import PatternError, config_patterns, engine_config, parse_definition
from app.pipelines import PipelineConfigError, parse_pipelines
from app.windows import WindowConfigError, load_window_defs, parse_window_def

SECTIONS = ("pipelines", "windows", "patterns", "sinks")


def load(path: str | Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The file's sections, or the error that it has none."""
    file = Path(path)
    if not file.is_file():
        return None, [f"{file}: no such file"]
    try:
        data = load_yaml(file.read_text()) or {}
    except yaml.YAMLError as exc:
        return None, [f"{file}: not valid YAML: {exc}"]
    if not isinstance(data, dict):
        return None, [f"{file}: the top level must be a mapping of sections {list(SECTIONS)}"]
    return data, []


def check_pipelines(raw: Any) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        return ["pipelines: must be a list of pipeline entries"]
    errors = []
    for i, entry in enumerate(raw):
        try:
            parse_pipelines([entry])
        except PipelineConfigError as exc:
            errors.append(f"pipelines[{i}]{exc.path.removeprefix('pipelines[0]')}: {exc.reason}")
    if not errors:
        try:
            parse_pipelines(raw)
        except PipelineConfigError as exc:
            errors.append(f"{exc.path}: {exc.reason}")
    return errors


def check_sinks(raw: Any) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        return ["sinks: must be a list of sink entries"]
    errors = []
    for i, entry in enumerate(raw):
        try:
            parse_sink(entry, f"sinks[{i}]")
        except SinkConfigError as exc:
            errors.append(str(exc))
    if not errors:
        try:
            parse_sinks(raw)
        except SinkConfigError as exc:
            errors.append(str(exc))
    return errors


def check_windows(raw: Any) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        return ["windows: must be a list of window definitions"]
    errors = []
    for i, entry in enumerate(raw):
        try:
            parse_window_def(entry, f"windows[{i}]")
        except WindowConfigError as exc:
            # The message starts with the entry (``windows[name]: ``); the path replaces it.
            errors.append(f"windows[{i}]: {str(exc).split(': ', 1)[-1]}")
    if not errors:
        try:
            load_window_defs(raw)
        except WindowConfigError as exc:
            errors.append(str(exc))
    return errors


def check_patterns(raw: Any) -> list[str]:
    if raw is None:
        return []
    try:
        engine = engine_config(raw)
    except PatternError as exc:
        return [f"{exc.field}: {exc.message}"]
    definitions = raw.get("definitions", []) if isinstance(raw, Mapping) else raw
    prefix = "patterns.definitions" if isinstance(raw, Mapping) else "patterns"
    if definitions is None:
        return []
    if not isinstance(definitions, list):
        return [f"{prefix}: must be a list of pattern definitions"]
    errors = []
    for i, definition in enumerate(definitions):
        try:
            parse_definition(definition, engine, "config")
        except PatternError as exc:
            errors.append(f"{prefix}[{i}].{exc.field}: {exc.message}")
    if not errors:
        try:
            config_patterns(engine, raw)
        except PatternError as exc:
            errors.append(f"{exc.field.replace('patterns.definitions', prefix, 1)}: {exc.message}")
    return errors


def check_config(path: str | Path) -> list[str]:
    """Every error of the config file at ``path``, each as ``path.in.file: message``."""
    data, errors = load(path)
    if data is None:
        return errors
    errors += [f"{name}: unknown section; the sections are {list(SECTIONS)}"
               for name in data if name not in SECTIONS]
    errors += check_pipelines(data.get("pipelines"))
    errors += check_windows(data.get("windows"))
    errors += check_patterns(data.get("patterns"))
    errors += check_sinks(data.get("sinks"))
    return errors


def summary(path: str | Path) -> str:
    data, _ = load(path)
    data = data or {}
    patterns = data.get("patterns")
    definitions = patterns.get("definitions") if isinstance(patterns, Mapping) else patterns
    return (f"{path}: ok ({len(data.get('pipelines') or [])} pipelines, "
            f"{len(data.get('windows') or [])} windows, {len(definitions or [])} patterns)")


__all__ = ["check_config", "summary"]
