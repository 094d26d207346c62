"""Interval joins of two streams: which pairs match, and when an unmatched record is
emitted. Pure: the buffered records live in a mapping the caller gives (a dict for an
HTTP batch and unit tests; a changelog-backed store for a live pipeline).

Semantics (docs/joins.md has the tables):

- A left record ``l`` and a right record ``r`` with the same key match when
  ``l.t - before <= r.t <= l.t + after`` (``within`` sets both).
- Each side's time is the largest event time seen on that side; stream time is the
  smaller of the two (as the watermark of a two-input operator in Flink), and the
  watermark is stream time minus ``grace``. A record whose time is below the watermark
  is *late*: it is neither joined nor buffered, and goes to the caller's late output.
  Why the smaller: two topics are not read in step (a backlog, a restart, a slow
  producer); with the larger, the side read ahead made the other side's records late
  and closed intervals whose partners were still to be read, emitting spurious
  unmatched records (measured: 42 % of a 2 x 150,000 backlog counted late).
- A buffered record can match no record that arrives after the watermark passes the end
  of its interval (``l.t + after`` for a left record, ``r.t + before`` for a right one:
  any partner would be late). Then its interval *closes*: it leaves the buffer, and a
  left (``left``, ``outer``) or right (``outer``) record that matched nothing is emitted
  alone, once. A record that is emitted alone is never followed by a match (the
  defect Kafka Streams fixed with KIP-633).
- Many-to-many: a record joins at most ``max_matches`` buffered partners (the oldest
  first); the pairs left out are counted in ``JoinCounts.limited``.
- Idle sides (live joins with ``idle_close``; ``IntervalJoin.mark_idle``): a side that
  received nothing for a while is *idle* until its next record, as an idle input in
  Flink: its time follows the other side's, so stream time (and the watermark) move
  with the side that still has input, and intervals close. When both sides of a
  partition are idle, every interval closes, and the watermark moves past the last of
  them, so no record that arrives later can match a record emitted unmatched (as
  windows close at ``idle_close``). A record of an idle side ends its idleness; it may
  be late then.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from operators.transform import RecordFailure, epoch_seconds

JOIN_TYPES = ("inner", "left", "outer")
LEFT, RIGHT = "l", "r"

#: One buffered record: [event time, arrival sequence, record, matched].
Buffered = list


class Held(list):
    """A buffered record kept as it arrived: ``[event time, arrival sequence,
    orjson.Fragment of its JSON, matched]``, the same JSON as a ``Buffered`` entry, and
    ``raw``, those bytes (a Fragment does not give them back), decoded when the record
    itself is needed (``record_of``).

    Why: a live join's state is one value per join key holding all its buffered
    records, and nearly every key changes between two commits, so each commit encodes
    every buffered record again (28 % of the join's CPU: docs/performance.md, "The live
    join"). A Fragment is copied into the value as it is, not encoded; and an output
    whose records need no change embeds them the same way (``merged``, ``encoded``)."""

    __slots__ = ("raw",)


def record_of(side: Any) -> dict[str, Any]:
    """The record of a ``Joined`` side or of a buffered entry's record slot: a record
    (dict) as it is, a ``Held`` entry decoded from its bytes."""
    return side if side.__class__ is dict else orjson.loads(side.raw)


def _buffered(entry: list) -> Any:
    """What a ``Joined`` carries of a buffered entry: the ``Held`` entry itself (its
    bytes), or a decoded entry's record."""
    return entry if entry.__class__ is Held else entry[2]


def _encoded(side: Any) -> Any:
    """A ``Joined`` side as orjson writes it: a ``Held`` entry's Fragment, else as is."""
    return side[2] if side.__class__ is Held else side


@dataclass(frozen=True)
class JoinSpec:
    """A parsed ``join`` step (operators.steps.parse_join checks the raw spec)."""

    on: tuple[str, ...]
    before: float
    after: float
    grace: float
    type: str = "inner"
    time_field: str = "ts"
    max_matches: int = 1000
    #: Flat output: each side's fields under its prefix; None: ``{"left": …, "right": …}``.
    prefixes: tuple[str, str] | None = None
    #: Live joins: seconds without input after which a side is idle (0: never).
    idle_close: float = 0.0
    #: Live joins: the two topics are not keyed by the join key; each is re-keyed
    #: through an internal topic first (agents/join.py).
    repartition: bool = False

    def emits_unmatched(self, side: str) -> bool:
        return self.type == "outer" or (self.type == "left" and side == LEFT)


@dataclass
class JoinCounts:
    """What a join did: records in per side, pairs and unmatched records out, late
    records, and pairs left out by ``max_matches``."""

    left: int = 0
    right: int = 0
    pairs: int = 0
    unmatched: int = 0
    late: int = 0
    limited: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(slots=True)
class Joined:
    """One output of the join: the pair (a side is None when unmatched), its event
    time (the later of the two) and that time as written in the record it comes from
    (``raw``: the output's time field; the left one on a tie). A side is a record, or
    a ``Held`` entry of a record buffered with its bytes (``record_of`` decodes it).
    ``key``: the join key's text (``join_key``), when the join knows it."""

    left: Any
    right: Any
    time: float
    raw: Any
    key: str | None = None


def join_key(record: Mapping[str, Any], on: Sequence[str]) -> str:
    """The join key of a record: its ``on`` fields as JSON text."""
    try:
        values = [record[f] for f in on]
    except KeyError:
        raise RecordFailure(f"join field(s) missing: {[f for f in on if f not in record]}") from None
    value = values[0] if len(values) == 1 else values
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # e.g. an integer past 64 bits, which orjson does not write
        return json.dumps(value, sort_keys=True, default=str)


def event_time(record: Mapping[str, Any], time_field: str) -> float:
    value = record.get(time_field)
    if value is None:
        raise RecordFailure(f"time field {time_field!r} is missing")
    seconds = epoch_seconds(value)
    if not math.isfinite(seconds):
        raise RecordFailure(f"time field {time_field!r} is not a time: {value!r}")
    return seconds


class IntervalJoin:
    """The join of one partition's two streams.

    ``buffers`` maps a join key to ``{"l": [Buffered…], "r": [Buffered…]}`` (JSON
    values, so a store can persist them); ``times`` (the largest event time seen per
    side) and ``seq`` are the rest of the state. ``closing`` is an index of the buffered records by the time their
    interval closes, rebuilt from ``buffers`` (``rebuild_index``) after a restore."""

    def __init__(self, spec: JoinSpec, buffers: MutableMapping[str, dict[str, list[Buffered]]] | None = None,
                 times: Mapping[str, float] | None = None, seq: int = 0, idle: Iterable[str] = (),
                 encoded_outputs: bool = True) -> None:
        """``encoded_outputs``: the outputs are written as they are (``merged`` with
        ``encoded``), not read, so a record added with its bytes is carried as those."""
        self.spec = spec
        self.encoded_outputs = encoded_outputs
        self.buffers = {} if buffers is None else buffers
        self.times = {LEFT: -math.inf, RIGHT: -math.inf}
        if times:
            self.times.update(times)
        self.seq = seq
        #: The sides marked idle (``mark_idle``) and without a record since.
        self.idle: set[str] = set(idle)
        self.counts = JoinCounts()
        self.closing: list[tuple[float, int, str, str]] = []
        self.rebuild_index()

    def rebuild_index(self) -> None:
        self.closing = [(self._closes_at(side, entry[0]), entry[1], key, side)
                        for key, sides in self.buffers.items() for side, entries in sides.items()
                        for entry in entries]
        heapq.heapify(self.closing)
        # A commit's write can hold buffers newer than its bookkeeping value: numbering
        # goes on after the highest buffered one, so no two entries share a number
        # (``close`` removes the entry with the number it pops).
        self.seq = max(self.seq, max((c[1] for c in self.closing), default=0))

    def _closes_at(self, side: str, t: float) -> float:
        return t + (self.spec.after if side == LEFT else self.spec.before)

    @property
    def stream_time(self) -> float:
        """The smaller of the two sides' times (-inf until both sides were seen)."""
        left, right = self.times[LEFT], self.times[RIGHT]
        return left if left <= right else right

    @property
    def watermark(self) -> float:
        return self.stream_time - self.spec.grace

    def add(self, side: str, record: dict[str, Any], raw: bytes | None = None) -> list[Joined] | None:
        """One record of ``side`` (``"l"`` or ``"r"``): the pairs it makes, then the
        unmatched records whose intervals its time closed; None when it is late.
        Raises RecordFailure when the record has no key or time.

        ``raw``: the record's JSON as it arrived (a live join's input): buffered as a
        ``Held`` entry, and the outputs carry it instead of the record."""
        spec = self.spec
        key = join_key(record, spec.on)
        tf = spec.time_field
        t = event_time(record, tf)
        idle = self.idle
        if idle:
            idle.discard(side)  # input: no longer idle (the record may be late)
        if t < self.watermark:
            self.counts.late += 1
            return None
        if side == LEFT:
            self.counts.left += 1
        else:
            self.counts.right += 1
        sides = self.buffers.get(key)
        if sides is None:
            sides = {LEFT: [], RIGHT: []}
        out: list[Joined] = []
        # Partner times that match: for a left record [t - before, t + after]; for a
        # right record the left times l with l - before <= t <= l + after.
        lo, hi = (t - spec.before, t + spec.after) if side == LEFT else (t - spec.after, t + spec.before)
        found = 0
        matched = False
        self.seq += 1
        if raw is None:
            entry = [t, self.seq, record, matched]
            this: Any = record
        else:
            entry = Held((t, self.seq, orjson.Fragment(raw), matched))
            entry.raw = raw
            # Outputs that are only written carry its bytes; others the record in hand.
            this = entry if self.encoded_outputs else record
        for partner in sides[RIGHT if side == LEFT else LEFT]:
            if lo <= partner[0] <= hi:
                if found == spec.max_matches:
                    self.counts.limited += 1
                    partner[3] = matched = True  # it had a partner: never emitted alone
                    continue
                found += 1
                partner[3] = matched = True
                other = partner if partner.__class__ is Held else partner[2]
                # The later time of the pair, the left one on a tie.
                if side == LEFT:
                    out.append(Joined(this, other, t, record[tf], key) if t >= partner[0]
                               else Joined(this, other, partner[0], record_of(other)[tf], key))
                else:
                    out.append(Joined(other, this, partner[0], record_of(other)[tf], key) if partner[0] >= t
                               else Joined(other, this, t, record[tf], key))
        entry[3] = matched
        sides[side].append(entry)
        self.buffers[key] = sides  # written back: a store sees the change
        heapq.heappush(self.closing, (self._closes_at(side, t), self.seq, key, side))
        self.counts.pairs += len(out)
        if t > self.times[side]:
            before = self.stream_time
            self.times[side] = t
            if idle:
                other = RIGHT if side == LEFT else LEFT
                if other in idle and self.times[other] < t:
                    self.times[other] = t  # an idle side's time follows this one
            if self.stream_time > before:
                out.extend(self.close(self.watermark))
        return out

    def mark_idle(self, side: str) -> list[Joined]:
        """``side`` received nothing for ``idle_close``: it is idle until its next record.
        Its time catches up with the other side's (and follows it from now on); when the
        other side is idle too, every interval closes, and both times move so that the
        watermark is past the end of the last one. Returns the unmatched records this
        closes, as ``add`` does."""
        other = RIGHT if side == LEFT else LEFT
        self.idle.add(side)
        times = self.times
        if other in self.idle:
            return self._close_everything()
        if times[other] <= times[side]:
            return []
        before = self.stream_time
        times[side] = times[other]
        return self.close(self.watermark) if self.stream_time > before else []

    def _close_everything(self) -> list[Joined]:
        if not self.closing:
            return []
        end = max(entry[0] for entry in self.closing)
        # Stream time such that the watermark (stream time - grace) is above ``end``:
        # a record arriving later can pair with none of the closed ones (it is late).
        target = end + self.spec.grace
        while target - self.spec.grace <= end:
            target = math.nextafter(target, math.inf)
        for s in (LEFT, RIGHT):
            if self.times[s] < target:
                self.times[s] = target
        return self.close(self.watermark)

    def close(self, watermark: float) -> list[Joined]:
        """Close every interval that ends before ``watermark``: drop those records from
        the buffers and return the unmatched ones the join type emits."""
        out: list[Joined] = []
        closing = self.closing
        while closing and closing[0][0] < watermark:
            _, seq, key, side = heapq.heappop(closing)
            sides = self.buffers.get(key)
            if sides is None:
                continue
            entries = sides[side]
            for i, entry in enumerate(entries):
                if entry[1] == seq:
                    del entries[i]
                    if not entry[3] and self.spec.emits_unmatched(side):
                        record = _buffered(entry)
                        raw = record_of(record)[self.spec.time_field]
                        out.append(Joined(record, None, entry[0], raw, key) if side == LEFT
                                   else Joined(None, record, entry[0], raw, key))
                    break
            if sides[LEFT] or sides[RIGHT]:
                self.buffers[key] = sides
            else:
                del self.buffers[key]
        self.counts.unmatched += len(out)
        return out

    def close_all(self) -> list[Joined]:
        """End of input: every interval closes (an HTTP batch's last step)."""
        return self.close(math.inf)


def merged(joined: Joined, spec: JoinSpec, encoded: bool = False) -> dict[str, Any]:
    """The output record of one join result. Nested: ``{"left": …, "right": …}``;
    flat: each side's fields under its prefix. Either way ``time_field`` holds the
    later time of the pair, as it was written in that record (``joined.raw``).

    ``encoded``: the result is only written as JSON, not read: a nested side buffered
    with its bytes (``Held``) stays an ``orjson.Fragment`` of them, written as it
    arrived instead of decoded and encoded again. Otherwise every side is a record."""
    left, right = joined.left, joined.right
    if spec.prefixes is None:
        if encoded:
            out: dict[str, Any] = {"left": _encoded(left), "right": _encoded(right)}
        else:
            out = {"left": None if left is None else record_of(left),
                   "right": None if right is None else record_of(right)}
    else:
        out = {}
        for record, prefix in ((left, spec.prefixes[0]), (right, spec.prefixes[1])):
            if record is not None:
                record = record_of(record)
            if record:
                for name, value in record.items():
                    out[prefix + name] = value
    out[spec.time_field] = joined.raw
    return out


@dataclass
class BatchJoin:
    """The join of an HTTP batch: both sides given, read in event-time order.

    The two inputs are interleaved as a two-topic consumer does: the next record is the
    head with the smaller event time (the left one on a tie), each side keeping its own
    order, so a record written after a later one in its list arrives out of order (and
    late when past the grace). A record without key or time fails at the join; at the
    end every interval closes."""

    spec: JoinSpec
    outputs: list[dict[str, Any]] = field(default_factory=list)
    #: (side, index in its input, reason) of each record that did not join.
    late: list[tuple[str, int]] = field(default_factory=list)
    failures: list[tuple[str, int, str]] = field(default_factory=list)

    def run(self, left: Sequence[dict[str, Any]], right: Sequence[dict[str, Any]]) -> JoinCounts:
        join = IntervalJoin(self.spec)
        for side, index, record in self._arrivals(left, right):
            try:
                results = join.add(side, record)
            except RecordFailure as exc:
                self.failures.append((side, index, str(exc)))
                continue
            if results is None:
                self.late.append((side, index))
            else:
                self._emit(results)
        self._emit(join.close_all())
        return join.counts

    def _emit(self, results: list[Joined]) -> None:
        for joined in results:
            self.outputs.append(merged(joined, self.spec))

    def _arrivals(self, left: Sequence[dict[str, Any]], right: Sequence[dict[str, Any]]
                  ) -> Iterator[tuple[str, int, dict[str, Any]]]:
        def timed(side: str, records: Sequence[dict[str, Any]]) -> Iterator[tuple[float, str, int, dict[str, Any]]]:
            for i, record in enumerate(records):
                try:
                    t = event_time(record, self.spec.time_field)
                except RecordFailure:
                    t = -math.inf  # fails at once, at the join
                yield t, side, i, record

        lefts, rights = list(timed(LEFT, left)), list(timed(RIGHT, right))
        i = j = 0
        while i < len(lefts) or j < len(rights):
            if j == len(rights) or (i < len(lefts) and lefts[i][0] <= rights[j][0]):
                _, side, index, record = lefts[i]
                i += 1
            else:
                _, side, index, record = rights[j]
                j += 1
            yield side, index, record


__all__ = ["JOIN_TYPES", "BatchJoin", "Held", "IntervalJoin", "JoinCounts", "JoinSpec", "Joined", "join_key",
           "merged", "record_of"]
