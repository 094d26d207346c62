"""schemathesis against a live worker, over every operation of GET /api/v1/openapi.json
(issue 20, item 4): no answer is a 5xx, and every answer conforms to the document
(status code, content type, body schema). Each operation gets its documented examples,
calls generated to fit the document and calls generated not to (MAX_EXAMPLES in all, to
keep the run short); the worker uses the repository's config/pipelines.yaml."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support import Worker, unique

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def worker():
    name = unique()
    w = Worker(app_id=name, topic_prefix=f"{name}.").start()
    yield w
    w.kill()


def operations(worker):
    """Every operation of the worker's own document."""
    # from_dict, not from_url: from_url leaves out the document's own operation.
    status, document = worker.get("/api/v1/openapi.json")
    assert status == 200, document
    schema = schemathesis.openapi.from_dict(document)
    return schema, [result.ok() for result in schema.get_all_operations()]


def fuzz(schema, operation, base_url: str) -> dict[int, int]:
    """Up to MAX_EXAMPLES calls of one operation, each checked: the document's examples
    (valid bodies reach the deeper code) and generated ones. The count of answers by status."""
    statuses: dict[int, int] = {}
    strategy = st.one_of(*schema.get_strategies_from_examples(operation), operation.as_strategy(),
                         operation.as_strategy(GenerationMode.NEGATIVE))

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case):
        response = case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=40)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    run()
    return statuses


def described(exc: BaseException) -> str:
    """The exception and, for a group (hypothesis' ``FlakyFailure``: failed once, then
    not), each exception in it: the check that failed and the answer it saw."""
    text = f"{type(exc).__name__}: {exc}"
    for inner in getattr(exc, "exceptions", ()):
        text += "\n  " + described(inner).replace("\n", "\n  ")
    return text


# schemathesis' pytest loader (schema.parametrize, from_fixture) reads a private
# attribute pytest 9 removed, so the operations are driven with hypothesis directly.
def test_every_operation_answers_within_its_contract(worker):
    schema, ops = operations(worker)
    assert len(ops) >= 16, [op.label for op in ops]
    failures = {}
    for op in ops:
        try:
            statuses = fuzz(schema, op, worker.url)
            print(op.label, dict(sorted(statuses.items())))
            assert statuses, "no call was made"
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - try every operation, report all
            failures[op.label] = described(exc)
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())


def test_docs_page_loads_only_local_assets(worker):
    status, page = worker.get("/docs")
    assert status == 200
    assert "http://" not in page and "https://" not in page and "//" not in page.replace("<!--", "")
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "init.js", "favicon-32x32.png"):
        assert f"/docs/{asset}" in page
        status, body = worker.get(f"/docs/{asset}")
        assert status == 200 and body, asset
    status, body = worker.get("/docs/../../etc/passwd")
    assert status == 404
