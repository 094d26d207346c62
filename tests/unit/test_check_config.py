"""``streametl check-config FILE`` (issue 20, item 4): the worker's own validators, every
bad entry reported with its path in the file, exit status 1 on errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app.check_config import check_config

REPO = Path(__file__).resolve().parents[2]

BAD = """\
pipelines:
  - name: a
    source: events
    sink: out
    steps: [normalize, {op: map, set: {x: "1"}}, {op: filter, where: "value >"}]
  - {name: b, source: events, sink: events}
windows:
  - name: w
    source: s
    key_by: k
    window: {type: tumbling, size: -3}
    aggregations: [{name: c, type: count}]
patterns:
  definitions:
    - {name: p, type: threshold, key_by: user_id, where: "value >>> 3"}
    - {name: q, type: sequence, key_by: u, within: 10m, steps: [{where: "x == 1", bogus: 2}]}
pipeline: []
"""


def test_every_bad_entry_is_reported_with_its_path(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text(BAD)
    errors = check_config(file)
    paths = [e.split(":", 1)[0] for e in errors]
    assert paths == [
        "pipeline",
        "pipelines[0].steps[2].where",
        "pipelines[1].sink",
        "windows[0]",
        "patterns.definitions[0].where",
        "patterns.definitions[1].steps[0].bogus",
    ], errors
    assert "size must be > 0" in errors[3]


def test_what_spans_entries_is_checked_once_entries_are_valid(tmp_path):
    file = tmp_path / "dup.yaml"
    file.write_text("pipelines:\n  - {name: a, source: x, sink: y}\n  - {name: a, source: x, sink: z}\n")
    assert check_config(file) == ["pipelines[1].name: name used twice"]


def test_an_unreadable_file_is_one_error(tmp_path):
    assert check_config(tmp_path / "missing.yaml") == [f"{tmp_path / 'missing.yaml'}: no such file"]
    file = tmp_path / "list.yaml"
    file.write_text("- 1\n")
    assert "top level must be a mapping" in check_config(file)[0]


def test_the_command_exits_1_on_errors_and_0_on_the_shipped_config(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text(BAD)
    bad = subprocess.run([sys.executable, "-m", "app", "check-config", str(file)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "pipelines[0].steps[2].where: " in bad.stderr
    good = subprocess.run([sys.executable, "-m", "app", "check-config", "config/pipelines.yaml"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert "ok (1 pipelines, 1 windows, 1 patterns)" in good.stdout
