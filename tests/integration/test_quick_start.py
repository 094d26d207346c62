"""The README's quick start, run as a newcomer runs it, on a clone of HEAD (issue 17).

A fresh clone has no `.venv`, no `.data` and nothing else the working copy hides. The
test clones the repository's HEAD, runs the README's run command (`make run`) and its
second-worker command there as written, pointed at the test broker through the
documented variables, runs every curl line of the README against them (each POST as
typed, with no content type header, and with `-H 'Content-Type: application/json'`;
the only change is the port; the run's topic prefix applies to the logical topic
names in the bodies as it does in the config), then
sends SIGTERM and requires both workers to be gone within 10 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import BOOTSTRAP, REPO, free_port, http, unique

README = REPO / "README.md"
JSON_HEADER = "-H 'Content-Type: application/json'"
STOP_LIMIT = 10.0


def bash_blocks(markdown: str) -> list[list[str]]:
    """The commands of each ```bash block: continuation lines and lines inside a
    single-quoted string joined, comments and blank lines dropped."""
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", body)
        commands, pending = [], ""
        for line in joined.splitlines():
            if not pending and (not line.strip() or line.strip().startswith("#")):
                continue
            pending = f"{pending}\n{line}" if pending else line.strip()
            if pending.count("'") % 2 == 0:  # no single-quoted string left open
                commands.append(pending)
                pending = ""
        blocks.append(commands)
    return blocks


def without_comment(command: str) -> str:
    """A shell line without its trailing `# ...` comment (none of ours quotes a #)."""
    return re.sub(r"\s+#.*$", "", command).strip()


def readme_commands() -> tuple[str, str, list[str]]:
    """(the run command, the second-worker command, every curl line) of the README."""
    blocks = bash_blocks(README.read_text())
    run_command = without_comment(blocks[0][0])
    worker_command = next(without_comment(c) for b in blocks for c in b if c.startswith("make worker"))
    # The quick start's worker speaks plain HTTP without tokens; the README's HTTPS
    # example is exercised by tests/integration/test_secured_kafka.py (HTTPS, tokens).
    curls = [c for b in blocks for c in b if c.startswith("curl ") and "https://" not in c]
    return run_command, worker_command, curls


def test_the_readme_is_what_this_test_runs():
    run_command, worker_command, curls = readme_commands()
    assert run_command == "make run"
    assert worker_command == "make worker WEB_PORT=6067"
    paths = {re.search(r"localhost:6066(/[^ ']*)", c).group(1).split("?")[0] for c in curls}
    assert {"/api/v1/produce", "/api/v1/process", "/api/v1/aggregate"} <= paths
    assert not any("Content-Type" in c for c in curls), "the README's examples send no -H"


def group_alive(proc: subprocess.Popen) -> bool:
    """Whether any process of ``proc``'s group is still there (``proc`` itself is
    reaped first: a zombie would count)."""
    proc.poll()
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_health(port: int, procs: list[subprocess.Popen], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
        try:
            if http("GET", f"http://127.0.0.1:{port}/health", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no healthy worker on :{port} in {timeout}s:\n{log.read_text()[-6000:]}")


def curl(command: str, cwd: Path) -> tuple[int, object]:
    """Run one README curl line; its HTTP status and parsed JSON body."""
    done = subprocess.run(command.replace("curl ", "curl -s -w '\\n%{http_code}' ", 1), shell=True,
                          cwd=cwd, capture_output=True, text=True, timeout=60)
    body, _, status = done.stdout.rpartition("\n")
    try:
        parsed = json.loads(body) if body.strip() else None
    except ValueError:
        parsed = body
    return int(status or 0), parsed


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("git") is None,
                    reason="needs curl and git")
def test_quick_start_from_a_fresh_clone(tmp_path, kafka):
    run_command, worker_command, curls = readme_commands()
    clone = tmp_path / "streametl"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    assert not (clone / ".data").exists() and not (clone / ".venv").exists()

    port, second_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("STREAMETL_", "MAKE", "MFLAGS", "KAFKA_", "VIRTUAL_ENV"))}
    # A unique app id and topic prefix: runs on one broker never share topics or state.
    name = unique("quick")
    env.update(KAFKA_PORT=BOOTSTRAP.rsplit(":", 1)[1], STREAMETL_APP_ID=name,
               STREAMETL_TOPIC_PREFIX=f"{name}.", STREAMETL_WEB_PORT=str(port))
    log = tmp_path / "quick-start.log"
    procs: list[subprocess.Popen] = []
    try:
        with open(log, "ab") as out:
            procs.append(subprocess.Popen(run_command, shell=True, cwd=clone, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))
            # Building .venv from nothing is most of this wait.
            wait_health(port, procs, log, timeout=600)
            procs.append(subprocess.Popen(worker_command.replace("6067", str(second_port)), shell=True,
                                          cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
            wait_health(second_port, procs, log, timeout=180)
        assert (clone / ".data").is_dir()
        assert (clone / ".data" / f"worker-{second_port}").is_dir()

        answers: dict[str, object] = {}  # the first answer to each README line
        for command in curls:
            variants = [command]
            if " -d " in command:
                variants.append(command.replace(" -d ", f" {JSON_HEADER} -d ", 1))
            for variant in variants:
                variant = variant.replace("localhost:6066", f"localhost:{port}")
                status, body = curl(variant, clone)
                assert 200 <= status < 300, (variant, status, body)
                answers.setdefault(command, body)
        produced = next(answers[c] for c in curls if "/api/v1/produce" in c)
        assert produced["count"] == 1, produced
        processed = next(answers[c] for c in curls if "/api/v1/process" in c)
        assert processed["count"] == 1 and processed["input_count"] == 2, processed
        aggregated = next(answers[c] for c in curls if "-X POST" in c and "/api/v1/aggregate" in c)
        assert aggregated["window_id"] == "user_clicks" and aggregated["value"] == 1, aggregated
        # The other worker answers the same running aggregate: the line as typed and
        # the one with -H each added one record.
        status, state = http("GET", f"http://127.0.0.1:{second_port}/api/v1/aggregate/user_clicks")
        assert status == 200 and state["windows"][0]["count"] == 2, state

        started = time.monotonic()
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        while any(group_alive(p) for p in procs) and time.monotonic() - started < STOP_LIMIT + 30:
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        assert elapsed <= STOP_LIMIT, f"workers still alive {elapsed:.1f}s after SIGTERM:\n{log.read_text()[-4000:]}"
    finally:
        for proc in procs:
            if group_alive(proc):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
