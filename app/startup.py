"""The start-up path: the config file is read and checked here, once, and every
configured processor is registered here.

A worker (and ``streametl create-topics``) starts through ``App.discover``
(app/transport.py), which runs, in order:

1. :func:`config`: read the config file (``STREAMETL_PIPELINES_FILE``) and check every
   section: pipelines, windows (with the windows that pipelines' window steps declare),
   patterns and database sinks. A bad file stops the worker here, with its error.
2. Faust's autodiscovery of ``tables``, ``agents`` and ``web``: the tables are declared
   from :func:`config` (Faust needs every table before the worker starts), the
   ``@app.agent``/``@app.timer`` functions and the views register themselves.
3. :func:`register_processors`: the batch agents (with their topics and tables) of the
   configured pipelines, windows and pattern sources, and a service per database sink.

No module reads the config file or the environment on its own (Settings reads the
environment: app/settings.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from app.db_sinks import SinkSpec, parse_sinks
from app.patterns import EngineConfig, Pattern, config_patterns, engine_config
from app.pipelines import PipelineSpec, parse_pipelines, resolve_tables
from app.windows import WindowDef, load_window_defs


@dataclass(frozen=True)
class Config:
    """Everything the config file declares, checked."""

    pipelines: tuple[PipelineSpec, ...]
    #: The ``windows:`` section's windows, then those of pipelines' window steps.
    windows: tuple[WindowDef, ...]
    engine: EngineConfig
    #: The ``patterns:`` section's definitions, by name.
    patterns: dict[str, Pattern]
    #: The ``sinks:`` section's database sinks, then those of pipelines (``db_sink``).
    sinks: tuple[SinkSpec, ...]


@functools.cache
def config() -> Config:
    """The config file, read and checked once (``app.config_file``)."""
    from app.config_file import section

    pipelines = tuple(parse_pipelines(section("pipelines")))
    windows = tuple(load_window_defs() + [p.window for p in pipelines if p.window is not None])
    if len({d.name for d in windows}) != len(windows):
        raise ValueError(f"window names must be unique (pipeline window steps are named pipeline.<name>): "
                         f"{[d.name for d in windows]}")
    engine = engine_config()
    sinks = tuple(parse_sinks(section("sinks")) + [p.db_sink for p in pipelines if p.db_sink is not None])
    return Config(
        # A stream-table join may read a materialized table's topic.
        pipelines=tuple(resolve_tables(pipelines, sinks)),
        windows=windows,
        engine=engine,
        patterns=config_patterns(engine),
        sinks=sinks,
    )


_registered = False


def register_processors() -> None:
    """Register the batch agents and services of every configured processor, once
    (after autodiscovery: they use the tables and topics the modules declare)."""
    global _registered
    if _registered:
        return
    _registered = True
    from agents import db_sink, join, patterns, pipeline, table_join, window_aggregate
    from operators.table_join import TableJoinSpec
    from tables.patterns import source_topics

    cfg = config()
    for spec in cfg.sinks:
        db_sink.add_sink(spec)
    for source in cfg.engine.sources:
        patterns.make_source_agent(source, source_topics[source])
    for pipeline_spec in cfg.pipelines:
        if pipeline_spec.join is None:
            pipeline.build(pipeline_spec)
        elif isinstance(pipeline_spec.join, TableJoinSpec):  # a stream joined with a table
            table_join.build(pipeline_spec)
        else:  # the interval join of two topics (docs/joins.md)
            join.build(pipeline_spec)
    for defn in cfg.windows:
        window_aggregate.register(defn)


__all__ = ["Config", "config", "register_processors"]
