"""The OpenAPI document, the request models' answers and the config file's JSON Schema
(issue 20, item 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from app.models.config import SCHEMA_FILE, config_schema, schema_text

REPO = Path(__file__).resolve().parents[2]

# What a worker serves: every view module discovered, then the index and the document.
DOCUMENT = (
    "import json; from app import app; app.discover(); "
    "from web.common import ENDPOINTS; from web.openapi import openapi_document; "
    "print(json.dumps({'index': [[e.path, list(e.methods)] for e in ENDPOINTS], "
    "'document': openapi_document()}))"
)


@pytest.fixture(scope="module")
def served() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMETL_")}
    result = subprocess.run([sys.executable, "-c", DOCUMENT], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_route_of_the_api_index_is_in_the_openapi_document(served):
    paths = served["document"]["paths"]
    assert served["index"], "no endpoint registered"
    for path, methods in served["index"]:
        assert path in paths, f"{path} is in GET /api/v1 but not in the OpenAPI document"
        assert sorted(paths[path]) == sorted(m.lower() for m in methods), path


def test_the_document_is_openapi_3_1_that_schemathesis_loads(served):
    import schemathesis

    document = served["document"]
    assert document["openapi"] == "3.1.0"
    operations = [r.ok() for r in schemathesis.openapi.from_dict(document).get_all_operations()]
    assert len(operations) == sum(len(v) for v in document["paths"].values())
    # The request bodies come from the same models that validate them.
    produce = document["paths"]["/api/v1/produce"]["post"]
    assert produce["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ProduceBody")
    assert "ProduceBody" in document["components"]["schemas"]


def test_the_checked_in_config_schema_is_up_to_date():
    assert SCHEMA_FILE.read_text() == schema_text(), (
        "docs/pipelines.schema.json is stale: run `python -m app.models.config`"
    )


def test_the_shipped_config_file_conforms_to_the_schema():
    data = yaml.safe_load((REPO / "config" / "pipelines.yaml").read_text())
    jsonschema.Draft202012Validator(config_schema()).validate(data)


def test_the_schema_refuses_a_misspelt_step_parameter():
    def errors(step: dict) -> list:
        data = {"pipelines": [{"name": "p", "source": "a", "sink": "b", "steps": [step]}]}
        return list(jsonschema.Draft202012Validator(config_schema()).iter_errors(data))

    assert errors({"op": "filter", "wher": "x > 1"})
    assert not errors({"op": "filter", "where": "x > 1"})


def test_every_config_example_in_the_docs_conforms_to_the_schema():
    import re

    validator = jsonschema.Draft202012Validator(config_schema())
    checked = 0
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```ya?ml\n(.*?)```", doc.read_text(), flags=re.S):
            data = yaml.safe_load(block)
            if isinstance(data, dict) and set(data) & {"pipelines", "windows", "patterns"}:
                errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(data)]
                assert not errors, (doc.name, errors)
                checked += 1
    assert checked >= 3


def test_an_endpoint_registered_without_models_is_documented_as_answering_anything():
    """Views added with ``@endpoint(path, summary)`` alone (e.g. a text exposition) stay in
    the document without a claim on their media type or schema."""
    from web.common import Endpoint
    from web.openapi import openapi_document

    document = openapi_document([Endpoint("/api/v1/things/{id}", ("GET",), "Things")])
    get = document["paths"]["/api/v1/things/{id}"]["get"]
    assert get["responses"]["200"]["content"] == {"*/*": {"schema": {}}}
    assert get["parameters"][0]["name"] == "id"
    assert "default" in get["responses"]
