"""Live pipelines declared in the config file's ``pipelines:`` section.

    pipelines:
      - name: clean_events
        source: events            # logical topic (STREAMETL_TOPIC_PREFIX is prepended)
        steps: [deduplicate, normalize, {op: filter, where: "value > 0"}]
        sink: events.clean
        key_by: user_id           # optional: the sink message key comes from this field

The steps use exactly the language of ``POST /api/v1/process``. A bad entry stops the
worker at start with a message naming the pipeline, step and parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from app.config_file import section
from operators.steps import Step, StepSpecError, parse_steps

PIPELINE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


class PipelineConfigError(ValueError):
    """The ``pipelines:`` section is invalid; the message names the entry and field."""


@dataclass(frozen=True)
class PipelineSpec:
    """One validated pipeline."""

    name: str
    source: str
    sink: str
    steps: list[Step] = field(compare=False)
    step_specs: list[Any] = field(compare=False)
    key_by: str | None = None

    @property
    def has_state(self) -> bool:
        return any(s.op == "deduplicate" for s in self.steps)

    @property
    def reads_reference(self) -> bool:
        return any(s.op == "enrich" and s.params.source for s in self.steps)


def parse_pipelines(raw: Any) -> list[PipelineSpec]:
    """Validate the ``pipelines:`` section (a list of entries)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise PipelineConfigError("pipelines: must be a list of pipeline entries")
    specs: list[PipelineSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        where = f"pipelines[{i}]"
        if not isinstance(entry, dict):
            raise PipelineConfigError(f"{where}: must be an object with name, source, steps, sink")
        unknown = set(entry) - {"name", "source", "sink", "steps", "key_by", "description"}
        if unknown:
            raise PipelineConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
        name = entry.get("name")
        if not isinstance(name, str) or not PIPELINE_NAME.match(name):
            raise PipelineConfigError(f"{where}.name: must be 1-100 of letters, digits, '.', '_', '-'")
        where = f"pipeline {name!r}"
        if name in seen:
            raise PipelineConfigError(f"{where}: name used twice")
        seen.add(name)
        for fld in ("source", "sink"):
            if not isinstance(entry.get(fld), str) or not TOPIC_NAME.match(entry[fld]):
                raise PipelineConfigError(f"{where}.{fld}: must be a topic name")
        if entry["source"] == entry["sink"]:
            raise PipelineConfigError(f"{where}: source and sink must differ")
        key_by = entry.get("key_by")
        if key_by is not None and (not isinstance(key_by, str) or not key_by):
            raise PipelineConfigError(f"{where}.key_by: must be a field name")
        try:
            steps = parse_steps(entry.get("steps", []))
        except StepSpecError as exc:
            raise PipelineConfigError(f"{where}: {exc}") from None
        specs.append(PipelineSpec(name, entry["source"], entry["sink"], steps, entry.get("steps", []), key_by))
    return specs


def configured_pipelines() -> list[PipelineSpec]:
    """The pipelines of the config file (settings.pipelines_file)."""
    return parse_pipelines(section("pipelines"))
