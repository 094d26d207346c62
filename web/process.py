"""POST /api/v1/process: run transformation steps over a batch of records.

The same step code as the live pipelines; deduplication remembers within this batch,
enrichment reads the worker's reference data. Every input record is accounted for:
in the output, in ``dropped`` (with step and reason) or in ``failures``.
"""

from __future__ import annotations

from typing import Any

from operators.steps import MemoryContext, StepSpecError, parse_steps, run_batch
from tables.reference import reference_store
from web.common import ApiError, ApiView, endpoint, invalid

MAX_RECORDS = 10_000


@endpoint("/api/v1/process", "Transform a batch of records with the pipeline step language")
class Process(ApiView):
    async def post(self, request: Any) -> Any:
        body = await self.read_json_object(request)
        unknown = set(body) - {"records", "transformations"}
        if unknown:
            raise invalid(f"unknown fields: {sorted(unknown)}", {"fields": sorted(unknown)})
        records = body.get("records")
        if not isinstance(records, list):
            raise invalid("records must be a list of JSON objects", {"field": "records"})
        if len(records) > MAX_RECORDS:
            raise ApiError(413, "too_many_records", f"at most {MAX_RECORDS} records per request",
                           {"limit_records": MAX_RECORDS})
        if "transformations" not in body:
            raise invalid("transformations is required (a list of steps)", {"field": "transformations"})
        try:
            steps = parse_steps(body["transformations"])
        except StepSpecError as exc:
            raise invalid(str(exc), {"field": "transformations", **exc.details()}) from None
        if any(s.terminal for s in steps):
            raise invalid("stateful terminal steps (window) run only in live pipelines",
                          {"field": "transformations", "op": steps[-1].op})
        result = run_batch(steps, records, MemoryContext(lookup=reference_store.lookup))
        return self.reply({
            "records": result.records,
            "count": len(result.records),
            "input_count": len(records),
            "steps": [c.as_dict() for c in result.counts],
            "dropped": result.dropped,
            "failures": result.failures,
        })
