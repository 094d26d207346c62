"""What the database sink tests share: the sink's audit trail read back from
PostgreSQL, and the check that it shows nothing skipped and nothing applied twice."""

from __future__ import annotations

import asyncpg


async def sink_audit(dsn: str, sink: str, topic: str) -> tuple[dict[int, int], list[tuple[int, int, int]]]:
    """(stored next offset per partition, [(partition, first, last) of each batch])."""
    conn = await asyncpg.connect(dsn)
    try:
        offsets = {r["partition"]: r["next_offset"] for r in await conn.fetch(
            "SELECT partition, next_offset FROM streametl_sink_offsets WHERE sink = $1 AND topic = $2", sink, topic)}
        batches = [tuple(r) for r in await conn.fetch(
            "SELECT partition, first_offset, last_offset FROM streametl_sink_batches WHERE sink = $1 "
            "AND topic = $2 ORDER BY partition, first_offset", sink, topic)]
    finally:
        await conn.close()
    return offsets, batches


def assert_no_gap_no_overlap(offsets: dict[int, int], batches: list[tuple[int, int, int]],
                             ends: dict[int, int]) -> None:
    """Every partition's batches start at 0, follow each other with no gap (a skipped
    record) and no overlap (a record applied twice), and end at the topic's end."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for partition, first, last in batches:
        spans.setdefault(partition, []).append((first, last))
    for partition, end in ends.items():
        if end == 0:
            continue
        assert offsets.get(partition) == end, f"partition {partition}: stored {offsets.get(partition)}, end {end}"
        s = spans[partition]
        assert s[0][0] == 0, f"partition {partition} starts at {s[0][0]}"
        for (_, last), (nxt, _) in zip(s, s[1:], strict=False):
            assert nxt == last + 1, f"partition {partition}: {'overlap' if nxt <= last else 'gap'} after {last}"
        assert s[-1][1] + 1 == end


async def count_rows(dsn: str, table: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(f'SELECT count(*) FROM "{table}"')
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


def assert_every_record_applied_once(offsets: dict[int, int], batches: list[tuple[int, int, int]],
                                     records: dict[int, list[int]]) -> None:
    """The audit against the topic's records themselves (``records``: partition -> the
    offsets of its committed records), for a topic written in transactions, whose
    commit markers take offsets no record has: the batches never overlap, every record
    lies in one of them (nothing skipped), and the stored offset is past the last."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for partition, first, last in batches:
        spans.setdefault(partition, []).append((first, last))
    for partition, found in records.items():
        if not found:
            continue
        s = sorted(spans.get(partition, []))
        for (_, last), (nxt, _) in zip(s, s[1:], strict=False):
            assert nxt > last, f"partition {partition}: overlap after {last}"
        missed = [o for o in found if not any(first <= o <= last for first, last in s)]
        assert not missed, f"partition {partition}: records {missed[:5]} in no applied batch"
        assert offsets.get(partition) == s[-1][1] + 1 > max(found), f"partition {partition}: stored {offsets.get(partition)}"
