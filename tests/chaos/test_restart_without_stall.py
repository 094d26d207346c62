"""Restarts without a group-wide stall (issue 23, finding 6).

Two workers share a live stream. One is killed with kill -9 and restarted in place (same
web port and data folder, as a supervisor restarts it). With dynamic membership, the
restarted worker joined as a new member and the group's rebalance waited for the dead
member's session to time out (60 s): the restarted worker processed nothing, and the
surviving worker stopped too, for about a minute. With static membership
(``STREAMETL_GROUP_INSTANCE_ID``, app/transport.py) the restarted worker takes back its
member entry and its partitions without a rebalance.

Bounds are generous (this host is shared and slow); the old behaviour took twice as long.
A graceful stop must still hand the partitions on at once: a static member sends no
LeaveGroup in aiokafka, so without ``StaticLeave`` they waited out the session timeout.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.chaos.test_rebalance import events_from, settled
from tests.integration.test_delivery_semantics import FORWARD, PARTITIONS
from tests.support import LiveStream, create_topics, run, wait_for

#: Seconds: from the restart to processing again, and the longest pause of the other
#: worker. Dynamic membership took about 60 s for each (the session timeout).
BOUND = 30.0


def passthrough(worker) -> dict:
    """The worker's passthrough counter and assignment ({} while it is down)."""
    try:
        status, body = worker.get("/api/v1/passthrough", timeout=5)
    except OSError:
        return {}
    return body if status == 200 else {}


class Pauses:
    """Samples a worker's processed count every 0.1 s; the longest time without progress."""

    def __init__(self, worker) -> None:
        self.worker = worker
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), passthrough(self.worker).get("events", -1)))
            time.sleep(0.1)

    def longest(self) -> float:
        self._stop.set()
        self._thread.join(10)
        longest, since, last = 0.0, None, None
        for t, n in self.samples:
            if since is None or n != last:
                since, last = t, n
            longest = max(longest, t - since)
        return longest


def two_workers_on_a_live_stream(workers, namespace, env):
    _app_id, prefix = namespace
    topic = f"{prefix}passthrough"
    run(create_topics([topic], partitions=PARTITIONS))
    stream = LiveStream(topic, events_from(0), key="user_id")
    a = workers(**env).start(timeout=120)
    b = workers(**env).start(timeout=120)
    run(wait_for(lambda: passthrough(a).get("events") and passthrough(b).get("events")
                 and len(passthrough(a)["consumer"]["assigned"]) + len(passthrough(b)["consumer"]["assigned"])
                 == PARTITIONS, timeout=180, interval=0.2, what="both workers processing"))
    return a, b, stream


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_a_worker_restarted_after_kill9_is_processing_again_without_a_group_stall(workers, namespace, guarantee):
    env = {**FORWARD, "STREAMETL_PROCESSING_GUARANTEE": guarantee}
    a, b, stream = two_workers_on_a_live_stream(workers, namespace, env)
    pauses = Pauses(a)
    b.kill()
    time.sleep(2.0)  # the stream goes on while B is down
    restarted = time.monotonic()
    b.start(wait=False)
    run(wait_for(lambda: passthrough(b).get("events"), timeout=180, interval=0.1,
                 what="the restarted worker processing"))
    back_after = time.monotonic() - restarted
    time.sleep(3.0)
    a_longest = pauses.longest()
    events = stream.stop()
    print(f"\n[{guarantee}] restart -> processing again: {back_after:.1f} s; "
          f"longest pause of the other worker: {a_longest:.1f} s")
    assert back_after < BOUND, f"the restarted worker processed again only after {back_after:.1f} s"
    assert a_longest < BOUND, f"the other worker stood still for {a_longest:.1f} s"
    settled(*namespace, events)


def test_a_graceful_stop_hands_its_partitions_on_at_once(workers, namespace):
    """A static member that stops gracefully leaves the group (LeaveGroup v3 by its
    instance id): the other worker owns every partition well within the session timeout
    (45 s), and nothing is lost."""
    a, b, stream = two_workers_on_a_live_stream(workers, namespace, FORWARD)
    b.stop()
    stopped = time.monotonic()
    run(wait_for(lambda: len(passthrough(a).get("consumer", {}).get("assigned", ())) == PARTITIONS,
                 timeout=120, interval=0.1, what="A owning every partition"))
    took = time.monotonic() - stopped
    events = stream.stop()
    print(f"\ngraceful stop -> the other worker owns every partition: {took:.1f} s")
    assert took < BOUND, f"B's partitions reached A only after {took:.1f} s"
    settled(*namespace, events)
