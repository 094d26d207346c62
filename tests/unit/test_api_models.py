"""The request models answer exactly what the hand-written checks answered before them
(issue 20, item 4: validation moved onto the models, the error envelope unchanged), and
the fuzzer's findings stay fixed."""

from __future__ import annotations

import pytest

from app.settings import settings
from app.windows import WindowConfigError, parse_api_spec
from operators.windows import WindowSpecError
from web.aggregate import parse_aggregate
from web.api_models import ProcessBody
from web.common import ApiError
from web.produce import parse_produce

TOPIC_MESSAGE = "topic must be a Kafka topic name: 1-249 characters of letters, digits, '.', '_', '-'"


def refused(parse, body) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body)
    return info.value


@pytest.mark.parametrize("body,message,details", [
    ({"topic": "t", "messages": [{}], "nope": 1, "also": 2}, "unknown fields: ['also', 'nope']",
     {"fields": ["also", "nope"]}),
    ({"topic": 5, "messages": [{}]}, TOPIC_MESSAGE, {"field": "topic", "value": 5}),
    ({"topic": ".", "messages": [{}]}, TOPIC_MESSAGE, {"field": "topic", "value": "."}),
    ({"topic": "x" * 250, "messages": [{}]}, TOPIC_MESSAGE, {"field": "topic", "value": "x" * 250}),
    ({"topic": "t", "messages": []}, "messages must be a non-empty list of JSON objects", {"field": "messages"}),
    ({"topic": "t", "messages": [{}], "key_field": ""}, "key_field must be a non-empty string",
     {"field": "key_field"}),
    ({"topic": "t", "messages": [{}], "headers": {"a": 1}}, "headers must be an object of string to string",
     {"field": "headers"}),
    ({"topic": "t", "messages": [{}, 3]}, "messages[1] must be a JSON object, not int", {"index": 1}),
    ({"topic": "t", "key_field": "k", "messages": [{"k": None}]}, "messages[0] has no key field 'k'",
     {"index": 0, "field": "k"}),
])
def test_produce_answers_the_same_422s(body, message, details):
    err = refused(parse_produce, body)
    assert (err.status, err.code, err.message, err.details) == (422, "validation_error", message, details)


def test_produce_checks_keep_their_order_unknown_fields_first_then_topic():
    assert refused(parse_produce, {"topic": 1, "messages": 2, "x": 3}).details == {"fields": ["x"]}
    assert refused(parse_produce, {"topic": 1, "messages": 2}).details["field"] == "topic"


def test_too_many_messages_is_a_413_before_key_field_and_header_checks():
    body = {"topic": "t", "messages": [{}] * (settings.produce_max_messages + 1), "key_field": 3}
    err = refused(parse_produce, body)
    assert (err.status, err.code) == (413, "too_many_messages")


def test_a_topic_with_a_trailing_newline_is_refused():
    """Python's ``$`` matched before a final newline, so "events\\n" passed the old check
    and reached Kafka; the model's pattern anchors at the real end."""
    assert refused(parse_produce, {"topic": "events\n", "messages": [{}]}).details["field"] == "topic"


def test_process_answers_the_same_errors():
    err = refused(ProcessBody.parse_body, {"records": [], "transformations": [], "x": 1})
    assert (err.message, err.details) == ("unknown fields: ['x']", {"fields": ["x"]})
    err = refused(ProcessBody.parse_body, {"records": {}, "transformations": []})
    assert (err.message, err.details) == ("records must be a list of JSON objects", {"field": "records"})
    err = refused(ProcessBody.parse_body, {"records": [{}] * 10_001})
    assert (err.status, err.code) == (413, "too_many_records")
    err = refused(ProcessBody.parse_body, {"records": []})
    assert (err.message, err.details) == ("transformations is required (a list of steps)",
                                          {"field": "transformations"})
    # Steps are not the model's business: parse_steps names them.
    assert ProcessBody.parse_body({"records": [1], "transformations": "x"}).transformations == "x"


def test_aggregate_answers_the_same_errors():
    err = refused(parse_aggregate, {"window_id": "", "record": {}})
    assert (err.message, err.details) == ("window_id must be a non-empty string (max 256 characters)",
                                          {"field": "window_id"})
    err = refused(parse_aggregate, {"window_id": "w", "record": []})
    assert (err.message, err.details) == ("record must be a JSON object", {"field": "record"})
    err = refused(parse_aggregate, {"window_id": "w", "record": {}, "bogus": 1, "window_size": 2})
    assert (err.message, err.details) == ("unknown fields: ['bogus']", None)


@pytest.mark.parametrize("body", [
    {"window_type": "session", "step": 6.017445667011612e305, "gap": 1},
    {"window_type": "tumbling", "window_size": 1e300},
    {"window_size": 10**30},
])
def test_a_huge_window_span_is_a_validation_error_not_an_overflow(body):
    """schemathesis found POST /api/v1/aggregate answering 500 (OverflowError: cannot
    convert float infinity to integer) for a step of 6e305 seconds."""
    with pytest.raises((WindowSpecError, WindowConfigError)):
        parse_api_spec({"window_id": "w", "record": {}, **body})
    err = refused(parse_aggregate, {"window_id": "w", "record": {}, **body})
    assert err.status == 422


def test_the_json_log_formatter_writes_one_object_per_record_with_the_exception():
    import json
    import logging

    from app.logs import JsonFormatter, logging_config

    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("streametl.test", logging.ERROR, __file__, 1, "failed %s", ("x",),
                                   sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["message"]) == ("ERROR", "streametl.test", "failed x")
    assert entry["time"].endswith("+00:00")
    assert "ValueError: boom" in entry["exception"]
    assert logging_config("text") is None
    assert logging_config("json")["merge"] is True
