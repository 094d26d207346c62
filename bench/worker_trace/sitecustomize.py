"""A timeline of one worker's event loop, for lining up latency tails (issue 22).

Not part of the app: put this directory on ``PYTHONPATH`` and set
``BENCH_WORKER_TRACE=DIR``; every ``python -m app worker`` process started with both
appends JSON lines to ``DIR/worker-<pid>.jsonl`` (other processes are left alone):

* ``gc``: each collection (generation, collected objects, ``gc.get_count()`` before it),
  from ``gc.callbacks``;
* ``young`` (only with ``BENCH_GC_TYPES=1``): before a young collection of over 40,000
  objects, the young generation's most common types and a sample ``repr`` of each;
* ``lag``: the event loop did not run a 1 ms timer for longer than 10 ms (start, gap,
  ``cpu``: the main thread's CPU time meanwhile, which the machine's load does not
  stretch; ``proc_cpu``: all the process's threads'; near the gap, another thread held
  the interpreter; far below it, the process was not running; ``on_cpu`` and
  ``runnable``: the loop thread's time on a CPU and waiting for one, from the kernel's
  schedstat), with its Python stacks sampled every 5 ms while it was blocked;
* ``batch``: each ``deliver_batches`` (records, the age of its oldest record);
* ``freshen``: each ``FastConsumer.freshen`` (whether the loop waited for the fetch,
  records before and after);
* ``wait``: a batch waited for a commit section (``CommitGuard.processing``);
* ``section``: each commit section (``CommitGuard.committing``): its hold;
* ``encode``: each ``CacheSnapshot.encode_some`` part; ``store``: each
  ``StoreWrites.store`` (hand-over, changelog acks, RocksDB write); ``commit``: each
  ``FastConsumer._commit_snapshot``; ``take``: each ``WriteBackCache.snapshot``;
  ``offsets``: the commit's ``_filter_committable_offsets``; ``timers``:
  ``TimerIndex.refresh``;
* ``window``: each ``WindowRunner.process`` (records, results made, of them made ahead,
  its thread CPU, its apply and deliver seconds); ``close``: each ``_close_due`` that
  closes windows (partition, keys due, thread CPU), and with ``BENCH_PROFILE_CLOSE=1``
  a cProfile of each one over 500 keys in ``DIR/close-<pid>-<time>.prof``; ``ahead``:
  each ``_make_ahead`` chunk;
* ``send``: each ``KafkaIO.start_partitioned`` (topic, records, the hand-over's
  duration) with ``acked``: when the broker acknowledged it (wall clock).

Times are wall clock (``time.time()``, the clock the benchmarks stamp events with) and
durations in seconds. Analyse with ``python -m bench.trace_report``.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib.abc
import os
import sys
import threading
import time
import traceback

_DIR = os.environ.get("BENCH_WORKER_TRACE")
_ARGV = getattr(sys, "orig_argv", sys.argv)
_ON = bool(_DIR) and "app" in _ARGV and "worker" in _ARGV

_events: list = []
_lock = threading.Lock()
_path = os.path.join(_DIR, f"worker-{os.getpid()}.jsonl") if _ON else ""


def rec(kind: str, at: float, dur: float, **info) -> None:
    _events.append((kind, at, dur, info))


def _flush() -> None:
    import json

    with _lock:
        taken = _events[:]
        del _events[:len(taken)]
        if not taken:
            return
        with open(_path, "a") as f:
            for kind, at, dur, info in taken:
                f.write(json.dumps({"k": kind, "at": at, "dur": dur, **info}) + "\n")


# --- gc ------------------------------------------------------------------------------

_gc_start = [0.0, 0.0, (0, 0, 0)]
_GC_TYPES = bool(os.environ.get("BENCH_GC_TYPES"))


def _gc_cb(phase: str, info: dict) -> None:
    if phase == "start":
        if _GC_TYPES and info["generation"] == 0 and gc.get_count()[0] > 40000:
            import collections
            objs = gc.get_objects(generation=0)
            c = collections.Counter(type(o).__qualname__ for o in objs)
            sample = {}
            for o in objs[-3000:]:
                t = type(o).__qualname__
                if t not in sample:
                    try:
                        sample[t] = repr(o)[:300]
                    except Exception:
                        pass
            rec("young", time.time(), 0.0, n=len(objs), top=c.most_common(12), sample=sample)
        _gc_start[0], _gc_start[1], _gc_start[2] = time.time(), time.perf_counter(), gc.get_count()
    else:
        rec("gc", _gc_start[0], time.perf_counter() - _gc_start[1], gen=info["generation"],
            collected=info["collected"], counts=_gc_start[2])


# --- loop lag and what blocked it ------------------------------------------------------

_tick = [time.perf_counter()]
_main_ident = threading.main_thread().ident
_stacks: list = []


def _watchdog() -> None:
    frames = sys._current_frames
    while True:
        time.sleep(0.005)
        if time.perf_counter() - _tick[0] > 0.015:
            frame = frames().get(_main_ident)
            if frame is not None:
                stack = traceback.extract_stack(frame, limit=14)
                _stacks.append((time.time(), [f"{os.path.basename(s.filename)}:{s.lineno}:{s.name}"
                                              for s in stack[-10:]]))


def _schedstat(fd: int) -> tuple[int, int]:
    # The loop thread's time on a CPU and waiting for one (ns), from the kernel.
    if fd < 0:
        return 0, 0
    run, wait, _ = os.pread(fd, 100, 0).split()
    return int(run), int(wait)


async def _monitor() -> None:
    import asyncio

    try:
        sched_fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
    except OSError:
        sched_fd = -1
    last_flush = time.perf_counter()
    while True:
        before_w, before, cpu0, pcpu0 = time.time(), time.perf_counter(), time.thread_time(), time.process_time()
        run0, wait0 = _schedstat(sched_fd)
        _tick[0] = before
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        _tick[0] = now
        gap = now - before
        if gap > 0.010:
            run1, wait1 = _schedstat(sched_fd)
            taken = [s for s in _stacks if s[0] >= before_w - 0.001]
            _stacks.clear()
            rec("lag", before_w, gap, cpu=time.thread_time() - cpu0,
                proc_cpu=time.process_time() - pcpu0, on_cpu=(run1 - run0) / 1e9,
                runnable=(wait1 - wait0) / 1e9, stacks=taken[:40])
        elif _stacks:
            _stacks.clear()
        if now - last_flush > 1.0:
            last_flush = now
            _flush()


_monitor_started = [False]


def _start_monitor() -> None:
    if _monitor_started[0]:
        return
    import asyncio

    _monitor_started[0] = True
    asyncio.ensure_future(_monitor())
    threading.Thread(target=_watchdog, daemon=True, name="trace-watchdog").start()


# --- hooks into the app's modules, applied right after each is imported -----------------


def _timed_async(owner, name: str, kind: str, info=None) -> None:
    orig = getattr(owner, name)

    async def wrapper(*args, **kwargs):
        at, t0 = time.time(), time.perf_counter()
        try:
            return await orig(*args, **kwargs)
        finally:
            rec(kind, at, time.perf_counter() - t0, **(info(*args, **kwargs) if info else {}))

    setattr(owner, name, wrapper)


def _patch_transport(m) -> None:
    guard_cls, consumer_cls = m.CommitGuard, m.FastConsumer
    committing, processing = guard_cls.committing, guard_cls.processing

    @contextlib.asynccontextmanager
    async def traced_committing(self):
        called = time.time()
        async with committing(self):
            at, t0, cpu0 = time.time(), time.perf_counter(), time.thread_time()
            try:
                yield
            finally:
                rec("section", at, time.perf_counter() - t0, waited=at - called,
                    cpu=time.thread_time() - cpu0)

    @contextlib.asynccontextmanager
    async def traced_processing(self):
        called, t0 = time.time(), time.perf_counter()
        async with processing(self):
            waited = time.perf_counter() - t0
            if waited > 0.0005:
                rec("wait", called, waited)
            yield

    guard_cls.committing, guard_cls.processing = traced_committing, traced_processing

    deliver = consumer_cls.deliver_batches

    async def traced_deliver(self, records, *args, **kwargs):
        _start_monitor()
        at, t0 = time.time(), time.perf_counter()
        n = 0
        oldest = None
        for rs in records.values():
            if rs:
                n += len(rs)
                ts = rs[0].timestamp
                if oldest is None or ts < oldest:
                    oldest = ts
        try:
            return await deliver(self, records, *args, **kwargs)
        finally:
            rec("batch", at, time.perf_counter() - t0, n=n,
                age=None if oldest is None else at - oldest / 1000)

    consumer_cls.deliver_batches = traced_deliver
    freshen = consumer_cls.freshen

    async def traced_freshen(self, fetched, waited=False):
        at, t0 = time.time(), time.perf_counter()
        n_in = sum(len(rs) for rs in fetched[0].values())
        out = await freshen(self, fetched, waited)
        rec("freshen", at, time.perf_counter() - t0, waited=waited, n_in=n_in,
            n_out=sum(len(rs) for rs in out[0][0].values()))
        return out

    consumer_cls.freshen = traced_freshen

    def caller(*args, **kwargs):
        import asyncio

        task = asyncio.current_task()
        return {"task": None if task is None else getattr(task.get_coro(), "__qualname__", "?")}

    _timed_async(consumer_cls, "_commit_snapshot", "commit", caller)

    filt = consumer_cls._filter_committable_offsets

    def traced_filter(self, *args, **kwargs):
        at, t0 = time.time(), time.perf_counter()
        try:
            return filt(self, *args, **kwargs)
        finally:
            rec("offsets", at, time.perf_counter() - t0)

    consumer_cls._filter_committable_offsets = traced_filter


def _patch_store(m) -> None:
    _timed_async(m.WriteBackCache, "snapshot", "take")
    snap = m.CacheSnapshot
    encode_some = snap.encode_some

    def traced_encode(self, n):
        at, t0 = time.time(), time.perf_counter()
        try:
            return encode_some(self, n)
        finally:
            rec("encode", at, time.perf_counter() - t0, n=n)

    snap.encode_some = traced_encode

    writes = m.StoreWrites
    store = writes.store
    batches_cls = m.kafka_io.record_batches.__func__.__globals__["RecordBatches"]
    changelog_start = batches_cls.start
    marks_of: dict = {}

    async def timed_start(self, topic):
        marks = marks_of.get(id(self))
        s0 = time.perf_counter()
        future = await changelog_start(self, topic)
        if marks is not None:
            marks["hand_over"] = time.perf_counter() - s0
            future.add_done_callback(lambda _f: marks.setdefault("acked", time.perf_counter()))
        return future

    batches_cls.start = timed_start

    async def traced_store(self, *args) -> None:
        at, t0 = time.time(), time.perf_counter()
        marks: dict = {}
        marks_of[id(self.changelog)] = marks
        try:
            await store(self, *args)
        finally:
            marks_of.pop(id(self.changelog), None)
            end = time.perf_counter()
            acked = marks.get("acked", end)
            hand_over = marks.get("hand_over", 0.0)
            rec("store", at, end - t0, table=self.target.table.name, hand_over=hand_over,
                acks=acked - t0 - hand_over, rocksdb=end - acked, partitions=len(self.local),
                chunks=len(getattr(self, "full", ())))

    writes.store = traced_store


def _patch_patterns(m) -> None:
    idx = m.TimerIndex
    refresh = idx.refresh

    def traced_refresh(self):
        at, t0 = time.time(), time.perf_counter()
        try:
            return refresh(self)
        finally:
            dur = time.perf_counter() - t0
            if dur > 0.001:
                rec("timers", at, dur)

    idx.refresh = traced_refresh


def _patch_windows(m) -> None:
    runner = m.WindowRunner
    process = runner.process

    async def traced_process(self, parts):
        parts = list(parts)
        at, t0, cpu0 = time.time(), time.perf_counter(), time.thread_time()
        emitted, ahead = self.stats["emitted"], self.stats["made_ahead"]
        apply, deliver = self.timing["apply"], self.timing["deliver"]
        try:
            return await process(self, parts)
        finally:
            rec("window", at, time.perf_counter() - t0, n=sum(len(rs) for _, rs in parts),
                results=self.stats["emitted"] - emitted, cpu=time.thread_time() - cpu0,
                partitions=[p for p, rs in parts if rs], ahead=self.stats["made_ahead"] - ahead,
                apply=self.timing["apply"] - apply, deliver=self.timing["deliver"] - deliver)

    runner.process = traced_process
    make_ahead = runner._make_ahead

    def traced_make_ahead(self, p, due, keys):
        at, t0 = time.time(), time.perf_counter()
        try:
            return make_ahead(self, p, due, keys)
        finally:
            rec("ahead", at, time.perf_counter() - t0, partition=p, keys=len(keys))

    runner._make_ahead = traced_make_ahead
    close_due = runner._close_due

    def traced_close_due(self, p, out, final, results=None):
        at, t0, cpu0 = time.time(), time.perf_counter(), time.thread_time()
        times = self.due_times.get(p)
        n = len(self.due.get(p, {}).get(times[0], ())) if times and times[0] <= self.meta[p]["st"] else 0
        prof = None
        if n > 500 and os.environ.get("BENCH_PROFILE_CLOSE"):
            import cProfile
            prof = cProfile.Profile()
            prof.enable()
        try:
            return close_due(self, p, out, final, results)
        finally:
            if prof is not None:
                prof.disable()
                prof.dump_stats(os.path.join(_DIR, f"close-{os.getpid()}-{at:.3f}.prof"))
            if n:
                rec("close", at, time.perf_counter() - t0, partition=p, keys=n, cpu=time.thread_time() - cpu0)

    runner._close_due = traced_close_due


def _patch_kafka_io(m) -> None:
    io = m.KafkaIO
    start_partitioned = io.start_partitioned

    async def traced_start(self, topic, groups):
        at, t0 = time.time(), time.perf_counter()
        future = await start_partitioned(self, topic, groups)
        info = {"topic": topic, "n": sum(len(g) for g in groups.values()),
                "partitions": sorted(groups)}
        dur = time.perf_counter() - t0
        future.add_done_callback(lambda _f: rec("send", at, dur, acked=time.time(), **info))
        return future

    io.start_partitioned = traced_start


_HOOKS = {"app.transport": _patch_transport, "tables.store": _patch_store,
          "agents.patterns": _patch_patterns, "agents.window_aggregate": _patch_windows,
          "app.kafka_io": _patch_kafka_io}


class _PostImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        hook = _HOOKS.get(name)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            hook(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if _ON:
    os.makedirs(_DIR, exist_ok=True)
    gc.callbacks.append(_gc_cb)
    sys.meta_path.insert(0, _PostImport())
    atexit.register(_flush)
