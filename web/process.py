"""POST /api/v1/process: run transformation steps over a batch of records.

The same step code as the live pipelines; deduplication remembers within this batch,
enrichment reads the worker's reference data. Every input record is accounted for:
in the output, in ``dropped`` (with step and reason) or in ``failures``.
"""

from __future__ import annotations

from typing import Any

from operators.steps import MemoryContext, StepSpecError, parse_steps, run_batch
from operators.table_join import TableJoinSpec
from tables.reference import reference_store
from web.api_models import PROCESS_MAX_RECORDS, ProcessBody, ProcessResult
from web.common import ApiView, Operation, endpoint, invalid

MAX_RECORDS = PROCESS_MAX_RECORDS


@endpoint("/api/v1/process", "Transform a batch of records with the pipeline step language",
          post=Operation(ProcessResult, body=ProcessBody))
class Process(ApiView):
    async def post(self, request: Any) -> Any:
        req = ProcessBody.parse_body(await self.read_json_object(request))
        records = req.records
        try:
            # The step language's rules live in parse_steps (the model describes its shape).
            steps = parse_steps(req.transformations)
        except StepSpecError as exc:
            raise invalid(str(exc), {"field": "transformations", **exc.details()}) from None
        if any(s.terminal for s in steps):
            raise invalid("stateful terminal steps (window) run only in live pipelines",
                          {"field": "transformations", "op": steps[-1].op})
        for step in steps:
            if step.op == "join" and step.params[2] is None:
                inline, live = (("table_records", "with_table") if isinstance(step.params[0], TableJoinSpec)
                                else ("with_records", "with"))
                raise invalid(f"step {step.index} (join): over HTTP give the other side inline as "
                              f"'{inline}' (a topic in '{live}' is for live pipelines)",
                              {"field": "transformations", "step": step.index, "op": "join", "parameter": live})
        if req.keys is not None and not (steps and steps[0].op == "cdc"):
            raise invalid("keys are the message keys of change events: they need a cdc first step",
                          {"field": "keys"})
        result = run_batch(steps, records, MemoryContext(lookup=reference_store.lookup), req.keys)
        return self.reply({
            "records": result.records,
            "count": len(result.records),
            "input_count": len(records),
            "steps": [c.as_dict() for c in result.counts],
            "dropped": result.dropped,
            "failures": result.failures,
        })
