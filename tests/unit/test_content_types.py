"""Which request bodies are read as JSON (issue 17): curl's `-d` with no `-H` must work,
a cross-site browser form must not."""

from __future__ import annotations

import pytest

from web.common import json_body_allowed

BROWSER = "http://elsewhere.example"


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"])
@pytest.mark.parametrize("origin", [None, BROWSER])
def test_json_is_always_read(content_type, origin):
    assert json_body_allowed(content_type, origin)


@pytest.mark.parametrize("content_type", ["", "application/x-www-form-urlencoded", "text/plain",
                                          "text/plain;charset=UTF-8"])
def test_simple_types_are_read_from_clients_that_are_not_browsers(content_type):
    assert json_body_allowed(content_type, None)


@pytest.mark.parametrize("content_type", ["", "application/x-www-form-urlencoded", "text/plain",
                                          "multipart/form-data; boundary=x"])
def test_simple_types_from_a_browser_are_refused(content_type):
    assert not json_body_allowed(content_type, BROWSER)


@pytest.mark.parametrize("content_type", ["application/xml", "multipart/form-data; boundary=x", "image/png"])
def test_other_types_are_refused(content_type):
    assert not json_body_allowed(content_type, None)
