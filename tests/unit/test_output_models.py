"""One schema per output (issue 18, item 5): the bytes the worker writes for a window
result and an alert are generated from the fields of the model that documents them
(app/models/output.py), so the two cannot drift apart."""

from __future__ import annotations

from types import SimpleNamespace

import orjson
import pytest

from app.models.output import INT, JSON, fields_of, json_template, object_builder
from app.models.patterns import Alert, alert_object
from app.models.windows import WindowResult, result_template


def test_an_alert_written_by_the_engine_is_the_alert_records_json(monkeypatch):
    """``agents.patterns.alert_value`` (the hot path: no Record built) writes exactly
    what orjson makes of ``Alert.to_json_dict()``."""
    import agents.patterns as engine

    monkeypatch.setattr(engine.time, "time", lambda: 1_700_000_123.25)
    p = SimpleNamespace(name="fraud", fingerprint="f1", kind="sequence", key_by="user_id", source="events")
    item = SimpleNamespace(table_key="user_id=u1", key="u1")
    match = SimpleNamespace(at=1_700_000_000.5, evidence=[{"event_id": "e1", "ts": 1.0}],
                            detail={"steps": ["a", "b"]})
    value = engine.alert_value(p, item, match)
    want = Alert(alert_id=engine.alert_id(p, item.table_key, match), pattern="fraud", kind="sequence",
                 key_by="user_id", key="u1", at=match.at, detected_at=1_700_000_123.25,
                 evidence=match.evidence, detail=match.detail, source="events").to_json_dict()
    assert value == orjson.dumps(want)
    assert list(orjson.loads(value)) == list(fields_of(Alert))


def test_the_builders_take_exactly_the_models_fields():
    fields = dict.fromkeys(fields_of(Alert), 1)
    assert list(alert_object(**fields)) == list(fields_of(Alert))
    with pytest.raises(TypeError):
        alert_object(**{k: v for k, v in fields.items() if k != "detail"})
    with pytest.raises(TypeError):
        alert_object(**fields, severity="high")
    with pytest.raises(TypeError, match="missing"):
        result_template(source="s")


def test_a_template_is_the_models_json_with_placeholders():
    template = result_template(source="a%b", window="w", key=JSON, window_type="tumbling", start=INT,
                               end=INT, count=INT, aggregates=JSON, final=True, closed_by=None,
                               superseded=False)
    filled = template % (b'"k"', 1, 2, 3, b'{"n":3}')
    want = WindowResult(source="a%b", window="w", key="k", window_type="tumbling", start=1, end=2,
                        count=3, aggregates={"n": 3}, final=True, closed_by=None,
                        superseded=False).to_json_dict()
    assert filled == orjson.dumps(want)


def test_a_changed_model_changes_what_is_written():
    class Out:
        b: int
        a: str

    assert json_template(Out, a="x", b=INT) == b'{"b":%d,"a":"x"}'
    assert list(object_builder(Out)(a="x", b=1)) == ["b", "a"]
