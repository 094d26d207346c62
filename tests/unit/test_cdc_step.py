"""The ``cdc`` step (issue 21 item 1): a Debezium change stream through the step language.

Covers operators.steps.run_change (what a live cdc pipeline does per record) and
run_batch (POST /api/v1/process): tombstones become deletes (not ``empty_value`` dead
letters), filter/map/normalize work on the row, a row a filter drops leaves the output
as a delete of its key, a duplicate changes nothing, malformed envelopes fail with
their reason; and app.pipelines' rules for cdc pipelines. The last test checks the
whole contract: the envelopes a pipeline writes, folded as a database sink folds them,
equal the filtered and mapped fold of the input."""

from __future__ import annotations

import json

import pytest

from app.pipelines import PipelineConfigError, parse_pipelines
from operators.cdc import fold, parse_change
from operators.steps import MemoryContext, parse_steps, run_batch, run_change, runnable


def event(op, before=None, after=None, ts=1700000000000, wrapped=False):
    payload = {"op": op, "before": before, "after": after, "source": {"ts_ms": ts, "lsn": 7}}
    return json.dumps({"schema": {}, "payload": payload} if wrapped else payload).encode()


def key(i):
    return json.dumps({"id": i}).encode()


STEPS = [{"op": "cdc", "key": ["id"]}, {"op": "filter", "where": "score > 0"},
         {"op": "map", "set": {"double": "score * 2"}, "drop": ["secret"]}]


def run(steps, k, v):
    return run_change(runnable(parse_steps(steps)), k, v, MemoryContext())


def test_an_upsert_runs_its_row_through_the_steps():
    result = run(STEPS, key(1), event("u", after={"id": 1, "score": 2, "secret": "x"}))
    assert result.outcome is None and result.reason is None
    assert result.key == b'{"id":1}'
    assert result.output == {"op": "u", "before": None, "after": {"id": 1, "score": 2, "double": 4},
                             "source": {"ts_ms": 1700000000000}}


def test_a_tombstone_is_a_delete_not_an_empty_value():
    result = run(STEPS, key(5), None)
    assert result.outcome is None and result.reason is None
    assert result.key == b'{"id":5}' and result.output == {"op": "d", "before": {"id": 5}, "after": None}


def test_a_delete_and_a_truncate_pass_on():
    assert run(STEPS, key(3), event("d", before={"id": 3, "score": 9})).output == {
        "op": "d", "before": {"id": 3}, "after": None, "source": {"ts_ms": 1700000000000}}
    truncate = run(STEPS, None, event("t"))
    assert truncate.key is None and truncate.output["op"] == "t"


def test_a_row_the_filter_drops_becomes_a_delete_of_its_key():
    """An update that stops matching must remove the row a replica holds for it."""
    result = run(STEPS, key(2), event("u", after={"id": 2, "score": 0}))
    assert result.output == {"op": "d", "before": {"id": 2}, "after": None, "source": {"ts_ms": 1700000000000}}
    assert result.outcome.dropped == "filtered" and result.reason is None


def test_enrich_joins_the_row_and_a_row_without_reference_leaves_as_a_delete():
    steps = runnable(parse_steps([{"op": "cdc", "key": ["id"]},
                                  {"op": "enrich", "from": "regions", "key": "region", "on_missing": "drop"}]))
    ctx = MemoryContext(lookup=lambda source, k: {"eu": {"zone": "west"}}.get(k))
    joined = run_change(steps, key(1), event("c", after={"id": 1, "region": "eu"}), ctx)
    assert joined.output["after"] == {"id": 1, "region": "eu", "zone": "west"}
    orphan = run_change(steps, key(2), event("u", after={"id": 2, "region": "mars"}), ctx)
    assert orphan.output["op"] == "d" and orphan.outcome.dropped == "no_reference_row"


def test_a_duplicate_changes_nothing():
    steps = runnable(parse_steps([{"op": "cdc", "key": ["id"]}, {"op": "deduplicate", "fields": ["id", "v"]}]))
    ctx = MemoryContext()
    first = run_change(steps, key(1), event("c", after={"id": 1, "v": 1}), ctx)
    again = run_change(steps, key(1), event("c", after={"id": 1, "v": 1}), ctx)
    assert first.output["after"] == {"id": 1, "v": 1}
    assert again.output is None and again.outcome.dropped == "duplicate" and again.reason is None


@pytest.mark.parametrize("k,v,reason", [
    (key(1), b"{not json", "invalid_json"),
    (key(1), event("x", after={"id": 1}), "unknown_op"),
    (key(1), event("c"), "missing_after"),
    (None, None, "missing_key"),
    (key(1), b"[1]", "not_an_envelope"),
])
def test_malformed_envelopes_fail_with_their_reason(k, v, reason):
    result = run(STEPS, k, v)
    assert result.output is None and result.reason == reason
    assert result.outcome.step.op == "cdc" and result.outcome.failed


def test_a_failing_step_and_a_changed_key_fail():
    typed = [{"op": "cdc", "key": ["id"]}, {"op": "normalize", "schema": {"score": "integer"}}]
    bad = run(typed, key(1), event("c", after={"id": 1, "score": "high"}))
    assert bad.output is None and bad.reason == "step_failed" and bad.outcome.step.op == "normalize"
    renamed = run([{"op": "cdc", "key": ["id"]}, {"op": "map", "rename": {"id": "customer_id"}}],
                  key(1), event("c", after={"id": 1}))
    assert renamed.output is None and renamed.reason == "key_changed"


def test_without_key_fields_the_message_key_is_the_key():
    result = run(["cdc", "normalize"], json.dumps({"schema": {}, "payload": {"Id": 4}}).encode(),
                 event("c", after={"Id": 4, "Full Name": " Ada "}, wrapped=True))
    # normalize renames Id to id: the key field is gone, so the change fails rather
    # than write a row a later delete could not find.
    assert result.reason == "key_changed"
    ok = run(["cdc", {"op": "normalize", "snake_case": False}], b'{"Id": 4}', event("c", after={"Id": 4, "n": " a "}))
    assert ok.output["after"] == {"Id": 4, "n": "a"} and ok.key == b'{"Id":4}'
    assert run(["cdc"], b'{"Id": 4}', None).output == {"op": "d", "before": {"Id": 4}, "after": None}
    assert run(["cdc"], b"4", event("c", after={"Id": 4})).reason == "missing_key"


def test_the_process_api_batch_reads_keys_and_accounts_for_every_record():
    steps = parse_steps(STEPS)
    records = [json.loads(event("r", after={"id": 1, "score": 1})), None, json.loads(event("u", after={"id": 2, "score": 0})),
               "nonsense"]
    result = run_batch(steps, records, MemoryContext(), keys=[{"id": 1}, {"id": 9}, {"id": 2}, None])
    assert [(r["op"], r["after"] or r["before"]) for r in result.records] == [
        ("r", {"id": 1, "score": 1, "double": 2}), ("d", {"id": 9}), ("d", {"id": 2})]
    assert result.dropped == []
    assert [(f["index"], f["op"], f["code"]) for f in result.failures] == [(3, "cdc", "not_an_envelope")]
    counts = {c.op: c.as_dict() for c in result.counts}
    assert counts["cdc"]["failed"] == 1 and counts["filter"]["dropped"] == {"filtered": 1}


def test_the_cdc_step_must_come_first():
    with pytest.raises(Exception, match="must be the first step"):
        parse_steps(["normalize", "cdc"])


def pipeline(steps, sink, **extra):
    return parse_pipelines([{"name": "p", "source": "customers", "steps": steps, "sink": sink, **extra}])[0]


def test_a_cdc_pipelines_database_sink_reads_envelopes_and_lends_its_key():
    spec = pipeline(["cdc", {"op": "filter", "where": "score > 0"}],
                    {"type": "sqlite", "path": "x.db", "table": "t", "key": ["id"]})
    assert spec.is_cdc and spec.db_sink.format == "debezium" and spec.steps[0].params.key == ("id",)
    assert not pipeline(["normalize"], "out").is_cdc
    table = pipeline(["cdc"], {"type": "table", "table": "active", "key": ["id"]})
    assert (table.db_sink.name, table.db_sink.table, table.db_sink.format) == ("active", "active", "debezium")
    assert table.db_sink.source == table.sink == "pipeline.p.to-table"
    with pytest.raises(PipelineConfigError, match="must be the cdc step's key"):
        pipeline([{"op": "cdc", "key": ["id", "region"]}], {"type": "sqlite", "path": "x.db", "table": "t", "key": ["id"]})
    with pytest.raises(PipelineConfigError, match="keyed by the change's key") as caught:
        pipeline(["cdc"], "out", key_by="id")
    assert caught.value.path == "pipelines[0].key_by"
    with pytest.raises(PipelineConfigError, match="cannot end in a window step"):
        pipeline(["cdc", {"op": "window", "key_by": "id", "window": {"type": "tumbling", "size": 10},
                          "aggregations": [{"name": "n", "type": "count"}]}], "out")


def test_the_output_folded_like_a_sink_equals_the_filtered_mapped_fold_of_the_input():
    """Inserts, snapshot reads, updates in and out of the filter, deletes with
    tombstones, a re-insert: folding what the pipeline writes as a ``format: debezium``
    sink does leaves {id: map(row) for rows of the input's fold that pass the filter}."""
    stream = [(key(i), event("r", after={"id": i, "score": i % 3, "secret": "s"})) for i in range(12)]
    stream += [(key(i), event("u", after={"id": i, "score": (i + 1) % 3, "secret": "t"})) for i in range(0, 12, 2)]
    for i in (1, 4, 7):
        stream += [(key(i), event("d", before={"id": i})), (key(i), None)]
    stream += [(key(4), event("c", after={"id": 4, "score": 5, "secret": "u"}))]
    steps = runnable(parse_steps(STEPS))
    ctx = MemoryContext()
    written = [run_change(steps, k, v, ctx) for k, v in stream]
    replica = fold([parse_change(r.key, json.dumps(r.output).encode(), ["id"]) for r in written])
    source = fold([parse_change(k, v, ["id"]) for k, v in stream])
    want = {k: {"id": row["id"], "score": row["score"], "double": row["score"] * 2}
            for k, row in source.items() if row["score"] > 0}
    assert replica == want and len(want) >= 4
