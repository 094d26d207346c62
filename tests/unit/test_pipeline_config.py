"""The ``pipelines:`` config section: a terminal window step becomes a window fed by the
pipeline; bad window steps stop the worker with a message naming the step and field."""

from __future__ import annotations

import pytest

from app.pipelines import PipelineConfigError, parse_pipelines

WINDOW_STEP = {"op": "window", "key_by": "user_id", "time_field": "ts",
               "window": {"type": "tumbling", "size": 10}, "aggregations": [{"name": "n", "type": "count"}]}


def pipeline(steps, **extra):
    return [{"name": "clicks", "source": "events", "sink": "clicks.per_user", "steps": steps, **extra}]


def test_a_window_step_declares_a_window_fed_by_the_pipeline():
    (spec,) = parse_pipelines(pipeline(["normalize", WINDOW_STEP]))
    w = spec.window
    assert w is not None
    assert (w.name, w.source, w.sink, w.key_by, w.repartition) == (
        "pipeline.clicks", "pipeline.clicks.windowed", "clicks.per_user", "user_id", True)
    assert spec.output_topic == "pipeline.clicks.windowed"
    assert spec.key_by == "user_id"  # outputs keyed like the window
    assert spec.steps[-1].terminal


def test_a_pipeline_without_a_window_step_writes_to_its_sink():
    (spec,) = parse_pipelines(pipeline(["normalize"]))
    assert spec.window is None and spec.output_topic == "clicks.per_user"


@pytest.mark.parametrize("steps, message", [
    ([WINDOW_STEP, "normalize"], "must be the last step"),
    ([{**WINDOW_STEP, "sink": "x"}], "sink"),
    ([{**WINDOW_STEP, "window": {"type": "tumbling", "size": 0}}], "size"),
    ([{k: v for k, v in WINDOW_STEP.items() if k != "key_by"}], "key_by"),
    ([{**WINDOW_STEP, "aggregations": [{"name": "n", "type": "median-ish"}]}], "median-ish"),
])
def test_bad_window_steps_are_refused_naming_the_field(steps, message):
    with pytest.raises(PipelineConfigError) as err:
        parse_pipelines(pipeline(steps))
    assert message in str(err.value)
    assert "clicks" in str(err.value)
