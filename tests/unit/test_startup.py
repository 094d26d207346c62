"""Wiring in one visible place (issue 18, item 7; app/startup.py): the config file is
read and checked by the start-up path, processors are registered by it (not as a side
effect of importing their module), and only app/settings.py reads the environment."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "agents", "tables", "web", "operators")


def test_only_settings_reads_the_environment():
    found = []
    for path in sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")):
        if path == REPO / "app" / "settings.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb") \
                    and isinstance(node.value, ast.Name) and node.value.id == "os":
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found == [], f"read the environment through Settings (app/settings.py): {found}"


def run(code: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMETL_")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_importing_the_processor_modules_registers_nothing_the_start_up_path_does():
    code = (
        "import agents.pipeline, agents.window_aggregate, agents.patterns, agents.db_sink\n"
        "from app.batches import BATCH_AGENTS\n"
        "names = lambda: sorted(a.name for agents in BATCH_AGENTS.values() for a in agents)\n"
        "print(names())\n"
        "from app import app; app.discover(); print(names())\n"
        "app.discover(); print(len(names()))\n"  # a second discovery (create-topics) adds nothing
    )
    result = run(code, {})
    assert result.returncode == 0, result.stderr
    before, after, again = result.stdout.strip().splitlines()[-3:]
    # Only the fixed agents (decorated in their module, Faust's idiom) exist before.
    assert before == "['agents.patterns.repartitioned']"
    assert "pipeline.clean_events" in after and "agents.patterns.source.events" in after
    assert int(again) == len(eval(after))  # noqa: S307 - our own printed list


def test_the_config_is_checked_before_any_module_is_discovered(tmp_path):
    """A bad file stops discovery in ``startup.config`` (its error), before Faust
    imports tables/, agents/ or web/."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("windows:\n  - name: w\n    source: s\n")
    code = ("import sys\nfrom app import app\ntry:\n    app.discover()\nexcept Exception as exc:\n"
            "    print(type(exc).__name__, sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tables', 'agents', 'web')))\n")
    result = run(code, {"STREAMETL_PIPELINES_FILE": str(bad)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "WindowConfigError []"
