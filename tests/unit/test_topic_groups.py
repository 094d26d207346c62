"""Transactional ids are unique per copartitioned topic set (docs/delivery.md, X).

Faust builds a transactional id per active partition as ``{app id}-{topic group}-{p}``
and numbered topic groups by partition count, while it assigns each set of
co-subscribed topics of one count on its own. Two workers with different
subscriptions (a rolling config change) could then each own partition 0 of a
different one-partition topic, both under ``{app id}-0-0``: under exactly_once each
one's producer fenced the other's. These tests run the leader's assignment
(``_perform_assignment``, no broker) and check that no transactional id is active on
two workers."""

from __future__ import annotations

from types import SimpleNamespace

from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata
from faust.assignor.client_assignment import ClientAssignment, ClientMetadata

from app.transport import PartitionAssignor, unique_topic_groups


class Cluster:
    def __init__(self, partitions: dict[str, int]) -> None:
        self.partitions = partitions

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(self.partitions.get(topic, 0)))


def fake_app():
    tables = SimpleNamespace(data={}, changelog_topics=set())
    sensors = SimpleNamespace(on_assignment_start=lambda a: None, on_assignment_error=lambda *a: None,
                              on_assignment_completed=lambda *a: None)
    return SimpleNamespace(tables=tables, sensors=sensors, tracer=None,
                           conf=SimpleNamespace(canonical_url="http://w", id="app"))


def member(subscription: list[str], actives: dict[str, list[int]], url: str) -> ConsumerProtocolMemberMetadata:
    meta = ClientMetadata(assignment=ClientAssignment(actives=actives, standbys={}), url=url,
                          changelog_distribution={})
    return ConsumerProtocolMemberMetadata(4, subscription, meta.dumps())


def active_tids(assignor_cls, members: dict[str, ConsumerProtocolMemberMetadata],
                partitions: dict[str, int]) -> dict[str, set[str]]:
    """The transactional id of each active partition, per member, as each member's
    TransactionManager builds it from the topic groups the leader sent."""
    assignor = assignor_cls(fake_app())
    result = assignor._perform_assignment(Cluster(partitions), members)
    tids: dict[str, set[str]] = {}
    for member_id, assignment in result.items():
        meta = ClientMetadata.loads(assignor._decompress(assignment.user_data))
        tids[member_id] = {f"app-{meta.topic_groups[topic]}-{p}"
                           for topic, parts in meta.assignment.actives.items() for p in parts}
    return tids


def test_workers_with_different_subscriptions_never_share_a_transactional_id():
    """Worker b subscribes one one-partition topic (``t1``) and held it; worker a
    subscribes it and another one (``t2``). With Faust's numbering both topics are
    group 0: b keeps t1-0 and a gets t2-0, both ``app-0-0`` (each fences the other)."""
    from faust.assignor import PartitionAssignor as FaustPartitionAssignor

    members = {"a": member(["t1", "t2", "events"], {}, "http://a"),
               "b": member(["t1", "events"], {"t1": [0]}, "http://b")}
    partitions = {"t1": 1, "t2": 1, "events": 4}

    faust_tids = active_tids(FaustPartitionAssignor, members, partitions)
    assert faust_tids["a"] & faust_tids["b"] == {"app-0-0"}  # the defect, as Faust has it

    tids = active_tids(PartitionAssignor, members, partitions)
    assert not tids["a"] & tids["b"]
    assert {"app-0-0"} <= tids["a"] | tids["b"]


def test_one_set_per_partition_count_keeps_faust_numbers():
    """Every worker subscribes to the same topics (the usual case): the numbers, so
    the transactional ids, are Faust's (a rolling upgrade keeps fencing old workers)."""
    copartitioned = {4: [{"events", "events-changelog"}], 1: [{"alerts", "catalog"}], 8: [{"big"}]}
    assert unique_topic_groups(copartitioned) == {"alerts": 0, "catalog": 0, "events": 1,
                                                  "events-changelog": 1, "big": 2}


def test_each_further_set_of_a_count_gets_its_own_number():
    copartitioned = {1: [{"t2"}, {"t1", "t0"}], 4: [{"events"}]}
    assert unique_topic_groups(copartitioned) == {"t0": 0, "t1": 0, "events": 1, "t2": 2}
