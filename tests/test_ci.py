"""`.ci/run`: the README's test command is its last step, so the log ends with pytest's count."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / ".ci" / "run"


def _commands() -> list[str]:
    lines = [line.strip() for line in RUN.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_readme_test_command_is_the_last_step() -> None:
    readme = (ROOT / "README.md").read_text()
    quickstart = re.search(r"pip install -e '\.\[test\]' && (python -m pytest)\n", readme)
    assert quickstart, "README quickstart test command not found"
    commands = _commands()
    assert commands[-1] == quickstart.group(1)
    # every other step that prints a pytest-style closing line runs before it
    last = len(commands) - 1
    for step in (".ci/systemd-verify.sh", ".ci/fuzz.sh"):
        (index,) = [i for i, c in enumerate(commands) if c.startswith(step)]
        assert index < last, step


def test_any_failing_step_fails_the_run() -> None:
    assert "set -euo pipefail" in _commands()
    # no step's failure is swallowed
    assert not [c for c in _commands() if re.search(r"\|\|\s*(true|:)\s*$", c)]
