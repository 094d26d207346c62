"""A bare Faust agent that only counts, next to the raw aiokafka consumer group.

``--events`` ~300-byte click events are produced to a fresh 4-partition topic *before*
one worker (``STREAMETL_PASSTHROUGH_ENABLED=true``) starts; the rate is events counted /
time from the agent's first to its last counted batch (the worker's own clock, read from
``GET /api/v1/passthrough``), like the raw baseline's consume rate, which also starts at
its first received record. CPU is the worker process's, from ready to done.

Options (``--option K=V``): ``mode`` = ``batch`` (default; the batch delivery path of
app/batches.py, which the project's agents use), ``take`` (a Faust stream,
``stream.take(batch_max, within=batch_within)``), ``each`` (``async for event in
stream``), or ``all`` (the three in turn); ``profile`` =
a directory: the worker runs under pyinstrument and writes ``<scenario>.txt`` there on
shutdown; any ``STREAMETL_*`` key is passed to the worker's environment.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from bench.events import make_payloads
from bench.harness import Context, Result, process_cpu_seconds
from bench.scenarios.raw_aiokafka import produce_raw
from tests.support import Worker, create_topics

NAME = "agent-passthrough"
DESCRIPTION = "bare counting agent (batch path, Faust take or per event) vs the raw aiokafka consumer group"


class ProfiledWorker(Worker):
    """A worker run under pyinstrument (main thread, where Faust's hot path runs)."""

    profile_path: Path | None = None

    def start(self, wait: bool = True, timeout: float = 90.0) -> Worker:
        self.log_path = self.data_dir / f"worker-{self.web_port}.log"
        assert self.profile_path is not None
        cmd = [sys.executable, "-m", "pyinstrument", "-r", "text", "--show-all", "-o", str(self.profile_path),
               "-m", "app", "worker", "-l", "info", "--web-port", str(self.web_port)]
        self.proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2], env=self.environment(),
                                     stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if wait:
            self.wait_ready(timeout)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        # SIGINT lets pyinstrument write its report after Faust shuts down.
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


async def wait_counted(worker: Worker, n: int, timeout: float) -> dict:
    """Poll the worker's counter until it has counted ``n`` events."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = await asyncio.to_thread(worker.get, "/api/v1/passthrough")
        if status == 200 and body["events"] >= n:
            return body
        if worker.proc is not None and worker.proc.poll() is not None:
            raise RuntimeError(f"worker died:\n{worker.log_tail()}")
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{n} events not counted in {timeout}s:\n{worker.log_tail()}")


async def run_one(ctx: Context, mode: str, payloads: list[bytes], keys: list[bytes]) -> Result:
    ns = f"{ctx.namespace}{mode[:2]}"
    topic = f"{ns}.passthrough"
    await create_topics([topic], partitions=4)
    await produce_raw(ctx, topic, payloads, keys)
    # A bare worker: only the counting agent (the sample pipelines, windows and patterns
    # would otherwise share the consumer and the event loop; option STREAMETL_PIPELINES_FILE
    # overrides).
    env = {"STREAMETL_PASSTHROUGH_ENABLED": "true", "STREAMETL_PASSTHROUGH_MODE": mode,
           "STREAMETL_PIPELINES_FILE": str(Path(__file__).resolve().parents[1] / "config" / "bare.yaml")}
    env.update({k.upper(): v for k, v in ctx.args.options.items() if k.upper().startswith("STREAMETL_")})
    name = "agent-passthrough" if mode == "batch" else f"agent-passthrough-{mode}"
    profile_dir = ctx.args.options.get("profile")
    if profile_dir:
        worker: Worker = ProfiledWorker(app_id=ns, topic_prefix=f"{ns}.", env=env)
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        worker.profile_path = Path(profile_dir) / f"{name}.txt"
    else:
        worker = Worker(app_id=ns, topic_prefix=f"{ns}.", env=env)
    await asyncio.to_thread(worker.start, True, 180)
    try:
        assert worker.proc is not None
        cpu0 = process_cpu_seconds(worker.proc.pid)
        done = await wait_counted(worker, len(payloads), timeout=float(ctx.args.options.get("timeout", 900)))
        cpu = process_cpu_seconds(worker.proc.pid) - cpu0
    finally:
        await asyncio.to_thread(worker.stop)
    seconds = max(done["last_at"] - done["first_at"], 1e-6)
    return Result(
        name, done["events"], seconds, [], cpu,
        settings={"mode": mode, "batch_max/within": "STREAMETL_BATCH_* (defaults 2000 / 0.02)",
                  "max_poll_records": 5000, "partitions": 4},
        notes=["rate from the agent's first to last counted batch (worker clock); "
               "CPU of the worker from ready to done (includes startup idle)"],
        extra={"batches": done["batches"]},
    )


async def run(ctx: Context) -> list[Result]:
    opts = ctx.args.options
    mode = opts.get("mode", "batch")
    modes = ["batch", "take", "each"] if mode == "all" else [mode]
    events = make_payloads(ctx.events, ctx.keys)
    payloads = [orjson.dumps(e) for e in events]
    keys = [e["user_id"].encode() for e in events]
    return [await run_one(ctx, m, payloads, keys) for m in modes]
