"""Every agent, table and view module imports (what a worker does at start), and a
broken config stops discovery with its error instead of a warning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Faust agents and batch agents (app/batches.py) alike.
DISCOVER = ("from app import app; app.discover(); from app.batches import BATCH_AGENTS; "
            "print(sorted([*app.agents, *(a.name for agents in BATCH_AGENTS.values() for a in agents)]))")


def run_discovery(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMETL_")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", DISCOVER], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_all_modules_import_with_the_shipped_config():
    result = run_discovery({})
    assert result.returncode == 0, result.stderr
    assert "pipeline.clean_events" in result.stdout
    # The shipped patterns read the pipeline's source topic too: both must be registered.
    assert "agents.patterns.source.events" in result.stdout


def test_an_invalid_pipeline_config_stops_the_worker(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipelines:\n  - name: x\n    source: events\n    sink: out\n    steps: [{op: filter}]\n")
    result = run_discovery({"STREAMETL_PIPELINES_FILE": str(bad)})
    assert result.returncode != 0
    assert "parameter 'where'" in result.stderr
