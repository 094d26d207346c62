"""Table recovery when a rebalance interrupts it (Faust's ``Recovery``, no broker).

Issue 23, finding 4 (second bullet): under exactly_once, every restarted worker crashed
about 8 s after start in ``Recovery._seek_offsets`` with aiokafka's ``ValueError:
Offset must be a positive integer``. A rebalance that comes while Recovery waits for
the active changelogs replaces its partition sets in place; Faust's ``_restart_recovery``
swallows the ``RebalanceAgain`` of that wait and goes on to seek the *new* standby
partitions, whose start offsets it has not read yet (``None``). Here Faust's own
recovery loop runs against a consumer that checks offsets as aiokafka's ``seek`` does.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from faust.tables.recovery import Recovery as FaustRecovery
from faust.types import TP
from mode.utils.queues import FlowControlEvent, ThrowableQueue
from yarl import URL

from app.transport import Recovery

CHANGELOG = "app-dedupe-changelog"
P0, P1, P2 = (TP(CHANGELOG, p) for p in range(3))


class Table:
    recovery_buffer_size = 1000
    standby_buffer_size = 1000

    def persisted_offset(self, tp: TP) -> None:
        return None  # exactly_once: the local state was deleted at start

    def apply_changelog_batch(self, batch) -> None:
        pass

    async def on_changelog_event(self, event) -> None:
        pass

    async def on_recovery_completed(self, active_tps, standby_tps) -> None:
        pass


class Consumer:
    """What Recovery asks of the consumer; ``seek_wait`` checks offsets like aiokafka's
    ``seek`` (the in-loop consumer runs it in the same step)."""

    def __init__(self) -> None:
        self.ends = {P0: 10, P1: 5, P2: 0}  # P0 has records to restore
        self.seeks: list[dict] = []
        self.flow_resumed = 0

    async def highwaters(self, *tps):
        return {tp: self.ends[tp] for tp in tps}

    async def earliest_offsets(self, *tps):
        return {tp: 0 for tp in tps}

    async def seek_wait(self, offsets) -> None:
        for offset in offsets.values():
            if not isinstance(offset, int) or offset < 0:
                raise ValueError("Offset must be a positive integer")
        self.seeks.append(dict(offsets))

    def resume_partitions(self, tps) -> None:
        pass

    def pause_partitions(self, tps) -> None:
        pass

    def resume_flow(self) -> None:
        self.flow_resumed += 1

    async def perform_seek(self) -> None:
        pass

    def assignment(self):
        return {P0, P1, P2}

    async def position(self, tp):
        return None


class Tables(dict):
    def __init__(self, flow_control: FlowControlEvent) -> None:
        super().__init__(dedupe=Table())
        self._changelogs = {CHANGELOG: self["dedupe"]}
        self.changelog_topics = {CHANGELOG}
        self.changelog_queue = ThrowableQueue(flow_control=flow_control)
        self.standbys_ready = False

    def on_actives_ready(self) -> None:
        pass

    def on_standbys_ready(self) -> None:
        self.standbys_ready = True


def make_app():
    async def nothing(*args, **kwargs):
        return None

    flow_control = FlowControlEvent()
    assignment = SimpleNamespace(actives=set(), standbys=set())
    app = SimpleNamespace(
        conf=SimpleNamespace(stream_recovery_delay=0.0, broker_request_timeout=5.0,
                             recovery_consistency_check=True, store=URL("rocksdb://")),
        consumer=Consumer(), consumer_generation_id=0, in_transaction=False, in_recovery=False,
        tracer=None, _rebalancing_span=None, _producer=None, flow_control=flow_control,
        _fetcher=SimpleNamespace(maybe_start=nothing),
        on_rebalance_complete=SimpleNamespace(send=nothing),
        on_rebalance_end=lambda: None,
        assignor=SimpleNamespace(assigned_actives=lambda: assignment.actives,
                                 assigned_standbys=lambda: assignment.standbys),
    )
    app.tables = Tables(flow_control)
    return app, assignment


async def until(predicate, what: str) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def rebalance_during_active_recovery(recovery_class) -> tuple:
    app, assignment = make_app()
    recovery = recovery_class(app, app.tables)
    crashes: list[BaseException] = []

    async def crash(exc: BaseException) -> None:
        crashes.append(exc)

    recovery.crash = crash
    await recovery.start()
    try:
        # Generation 1: P0 active (10 records to restore), no standby.
        app.consumer_generation_id = 1
        assignment.actives, assignment.standbys = {P0}, set()
        await recovery.on_rebalance({P0}, set(), {P0}, 1)
        await until(lambda: app.consumer.flow_resumed, "recovery waiting for the active changelog")
        assert recovery.in_recovery

        # Generation 2 while it waits: P2 active (empty), P1 a new standby.
        app.consumer_generation_id = 2
        assignment.actives, assignment.standbys = {P2}, {P1}
        await recovery.on_rebalance({P0, P1, P2}, set(), {P1, P2}, 2)
        await until(lambda: crashes or recovery.completed.is_set(), "recovery to end")
        return crashes, app.consumer.seeks, recovery
    finally:
        await recovery.stop()


def test_faust_recovery_seeks_the_new_standbys_with_offsets_it_never_read():
    """The defect, on Faust's own Recovery (documents why app.transport.Recovery exists;
    if a Faust upgrade fixes it, this test says so)."""
    crashes, seeks, _ = asyncio.run(rebalance_during_active_recovery(FaustRecovery))
    assert len(crashes) == 1 and isinstance(crashes[0], ValueError)
    assert "Offset must be a positive integer" in str(crashes[0])


def test_a_rebalance_during_recovery_restarts_it_for_the_new_assignment():
    """Issue 23, finding 4: the interrupted recovery starts over for generation 2 (it
    reads P1's start offset before seeking it) instead of crashing the worker."""
    crashes, seeks, recovery = asyncio.run(rebalance_during_active_recovery(Recovery))
    assert crashes == []
    assert recovery.completed.is_set()
    assert seeks == [{P0: 0}, {P2: 0}, {P1: 0}]  # gen 1 actives; gen 2 actives, then standbys


def run_end_check(highwaters, offsets, position, eos=False, flushed=None, flowing=True):
    """Three turns of ``Recovery._find_transactional_ends`` on a recovery pass that has
    sought its active partitions (``position``: the consumer's, async; ``flowing``:
    whether the consumer's flow runs, False from a revocation to the next pass)."""
    import asyncio
    import logging
    from types import SimpleNamespace

    from app.transport import Recovery

    class Probe(Recovery):
        rounds = 0

        @property
        def should_stop(self):
            return self.rounds >= 3

        async def sleep(self, seconds):
            self.rounds += 1

        @property
        def log(self):
            return logging.getLogger("test")

    async def go():
        r = object.__new__(Probe)
        r.__dict__.update(
            _actives_seeked=True, in_recovery=True, active_highwaters=highwaters, active_offsets=offsets,
            app=SimpleNamespace(in_transaction=eos, consumer=SimpleNamespace(position=position, flow_active=flowing),
                                flow_control=SimpleNamespace(is_active=lambda: flowing)),
            tables=SimpleNamespace(changelog_queue=asyncio.Queue()),
            _signal_recovery_start=asyncio.Event(), _signal_recovery_end=asyncio.Event(),
            flush_buffers=lambda: (flushed if flushed is not None else []).append(1))
        await Probe._find_transactional_ends.fun(r)
        return r

    return asyncio.run(go())


@pytest.mark.parametrize("eos", [True, False], ids=["exactly_once", "at_least_once"])
def test_the_end_of_a_transactional_changelog_is_found_without_faust_s_10_s_wait(eos):
    """A changelog written in transactions ends with a commit marker, never delivered:
    Faust ended such a recovery only after two 5 s waits, and only under exactly_once
    (docs/delivery.md, S); an at_least_once worker, which reads read_committed too
    (section AR), waited for ever. The recovery now marks a partition read once its
    position is past the highwater (Faust's: the end offset - 1) with nothing queued,
    twice in a row with the offset unchanged, and signals the waiting pass (its buffers
    flushed first); a partition still short of its highwater is not ended, nor one whose
    position is at it (its last offset, maybe a record, not fetched yet)."""
    from faust.types import TP

    done, short, last = TP("cl", 0), TP("cl", 1), TP("cl", 2)
    positions = {done: 12, short: 5, last: 11}
    flushed = []

    async def position(tp):
        return positions[tp]

    def go(highwaters, offsets):
        return run_end_check(highwaters, offsets, position, eos=eos, flushed=flushed)

    r = go({done: 11}, {done: 9})
    assert r.active_offsets[done] == 11 and r.signal_recovery_end.is_set() and flushed == [1]
    r = go({done: 11, short: 20}, {done: 9, short: 4})
    assert r.active_offsets == {done: 11, short: 4} and not r.signal_recovery_end.is_set()
    r = go({done: 11, last: 11}, {done: 9, last: 10})
    assert r.active_offsets == {done: 11, last: 10} and not r.signal_recovery_end.is_set()


def test_the_end_check_survives_a_partition_taken_away_by_a_rebalance():
    """A worker stopped past its session (chaos 'zombie', seed 14) lost its partitions
    while its recovery pass still listed them: the end check asked the consumer for the
    position of a changelog partition no longer assigned, aiokafka raised
    IllegalStateError, and the Recovery service crashed the worker. Such a partition is
    skipped (the rebalance starts a new pass); the others are checked as before."""
    from aiokafka.errors import IllegalStateError
    from faust.types import TP

    gone, done = TP("cl", 0), TP("cl", 1)

    async def position(tp):
        if tp == gone:
            raise IllegalStateError(f"Partition {tp} is not assigned")
        return 12

    r = run_end_check({gone: 11, done: 11}, {gone: 9, done: 9}, position)
    assert r.active_offsets == {gone: 9, done: 11}
    assert not r.signal_recovery_end.is_set()


def test_a_recovery_end_signalled_for_an_earlier_pass_does_not_end_the_next_one(monkeypatch):
    """The end of a transactional changelog is signalled by a task of its own, and
    Faust clears that signal only at its changelog loop's next turn: left set, the next
    rebalance's pass ended at once, before reading the partitions it had just been given
    (a window partition's new owner ran on its standby copy's state: counts lost after a
    join and a graceful leave under exactly_once; docs/delivery.md, S). Seeking a pass's
    active partitions clears it."""
    import asyncio
    from types import SimpleNamespace

    from faust.tables.recovery import Recovery as FaustRecovery

    from app.transport import Recovery

    async def seek(self, consumer, tps, offsets, title):
        return None

    monkeypatch.setattr(FaustRecovery, "_seek_offsets", seek)

    async def go():
        r = object.__new__(Recovery)
        r.__dict__.update(_signal_recovery_end=asyncio.Event(), _actives_seeked=False,
                          _check_not_superseded=lambda: None, app=SimpleNamespace())
        r.signal_recovery_end.set()  # left over from the previous pass
        await Recovery._seek_offsets(r, None, [], {}, "standby")
        assert r.signal_recovery_end.is_set()  # standbys are not the pass's wait
        await Recovery._seek_offsets(r, None, [], {}, "active")
        return r

    r = asyncio.run(go())
    assert r._actives_seeked and not r.signal_recovery_end.is_set()


def test_the_end_check_waits_for_changelog_records_taken_but_not_delivered():
    """docs/delivery.md BB (chaos seed 17): aiokafka's position was past the highwater
    because the fetch loop had taken the last 2,636 records of a dedupe changelog, which
    it then dropped (a rebalance overtook the fetch) and was still putting back. The end
    check took that position for the end and the recovery finished without them. The
    consumer's position (``FastConsumer.position``) stays at the first record taken and
    not delivered, so the check waits; once they are delivered and applied it ends."""
    from types import SimpleNamespace

    from faust.types import TP

    from app.transport import FastConsumer

    changelog = TP("cl", 0)

    class Consumer:
        position = FastConsumer.position
        first_held = FastConsumer.first_held
        hold_fetched = FastConsumer.hold_fetched
        release_fetched = FastConsumer.release_fetched

        def __init__(self):
            self._held = {}

            async def aiokafka_position(tp):
                return 14301

            self._thread = SimpleNamespace(position=aiokafka_position)

    consumer = Consumer()
    taken = {changelog: [SimpleNamespace(offset=o) for o in range(11665, 14301)]}
    consumer.hold_fetched(taken)
    r = run_end_check({changelog: 14300}, {changelog: 11664}, consumer.position)
    assert r.active_offsets[changelog] == 11664 and not r.signal_recovery_end.is_set()
    consumer.release_fetched(taken)  # delivered: applied up to 14299 (14300: the marker)
    r = run_end_check({changelog: 14300}, {changelog: 14299}, consumer.position)
    assert r.active_offsets[changelog] == 14300 and r.signal_recovery_end.is_set()


def test_the_end_check_does_not_run_while_a_revocation_has_stopped_the_flow():
    """docs/delivery.md BE (chaos seed 26, exactly_once): a revocation stopped the flow
    and cleared the changelog records the consumer had taken, its position staying past
    them at the highwater + 1; the end check, still on the pass sought before, marked
    the window changelog partitions read to their highwaters, and the next generation
    (the same partitions) restored nothing: 600 windows lost, 25 short. Until the flow
    runs again (the next pass), nothing is marked read."""
    from faust.types import TP

    changelog = TP("window-changelog", 0)

    async def past_the_end(tp):
        return 6187

    r = run_end_check({changelog: 6186}, {changelog: -1}, past_the_end, eos=True, flowing=False)
    assert r.active_offsets[changelog] == -1 and not r.signal_recovery_end.is_set()
    r = run_end_check({changelog: 6186}, {changelog: 6185}, past_the_end, eos=True, flowing=True)
    assert r.active_offsets[changelog] == 6186  # flowing, and applied to its end: ended


def test_a_kept_partition_with_nothing_applied_is_restored_from_its_start():
    """docs/delivery.md BE, second defence: an end marked in memory for a partition
    whose store applied nothing (no saved offset) was carried into the next generation
    (Faust's ``_add`` keeps it), so its pass skipped the whole changelog. Such a
    partition of an on-disk store is read from its start; a saved offset, or a memory
    store (which saves none and keeps what it applied), is kept as Faust has it."""
    from types import SimpleNamespace

    from faust.types import TP

    from app.transport import Recovery

    tp = TP("window-changelog", 0)

    def table(saved, on_disk=True):
        data = SimpleNamespace(partition_path=lambda p: None) if on_disk else SimpleNamespace()
        return SimpleNamespace(data=data, persisted_offset=lambda _tp: saved)

    for tbl, want in ((table(None), None), (table(5000), 5000), (table(None, on_disk=False), 6186)):
        r = object.__new__(Recovery)
        r.__dict__["tp_to_table"] = {}
        offsets = {tp: 6186}  # an end marked in memory
        Recovery._add(r, tbl, tp, offsets)
        assert offsets[tp] == want
