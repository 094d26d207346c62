"""app/codec.py: the JSON helpers shared by the agents and stores."""

from __future__ import annotations

import orjson
import pytest

from app.codec import RecordError, dumps_held, loads_object


@pytest.mark.parametrize("value", [
    {"o": {"events": 14434}, "s": {"trend": {"f": "427184e12e", "st": {"p": [1795786669.8132713, 98.0, "e-1"]}}}},
    [1_700_000_000.25, {"a": None, "b": True}],
    "ünïcode",
    {str(i): "x" * 200 for i in range(40)},  # larger than orjson's first output buffer
])
def test_dumps_held_is_orjsons_json_in_a_plain_bytes_object(value):
    held = dumps_held(value)
    assert held == orjson.dumps(value)
    assert type(held) is bytes


def test_dumps_held_takes_orjsons_options():
    assert dumps_held({1: "a"}, orjson.OPT_NON_STR_KEYS) == b'{"1":"a"}'
    with pytest.raises(TypeError):
        dumps_held({1: "a"})  # as orjson: non-string keys need the option (encode_state relies on it)


def test_loads_object_refuses_what_is_not_a_json_object():
    assert loads_object(b'{"a": 1}') == {"a": 1}
    for raw, reason in ((None, "empty_value"), (b"{", "invalid_json"), (b"[1]", "not_an_object")):
        with pytest.raises(RecordError) as err:
            loads_object(raw)
        assert err.value.reason == reason
