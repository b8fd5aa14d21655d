"""config.example.toml documents every key the loader accepts, with its default."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

from pusherd.config import Config, documented_keys, load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def _flat(data: dict[str, Any]) -> set[str]:
    return {f"{section}.{key}" for section, table in data.items() for key in table}


def test_example_documents_every_key() -> None:
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    present = _flat(data)
    expected = {k for k in documented_keys() if not k.startswith("events.")}
    assert expected - present == set(), "keys missing from config.example.toml"
    assert present - documented_keys() == set(), "config.example.toml has keys the loader refuses"


def test_example_shows_a_commented_events_table() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    assert re.search(r"^#\s*\[\[events\]\]\s*$", text, re.MULTILINE)
    for key in sorted(k.split(".", 1)[1] for k in documented_keys() if k.startswith("events.")):
        assert re.search(rf"^#\s*{key}\s*=\s*\"[^\"]+\"", text, re.MULTILINE), key
    # the example table itself loads
    uncommented = "\n".join(
        line.lstrip("# ")
        for line in text.splitlines()
        if re.match(r"^#\s*(\[\[events|name|scope)", line)
    )
    events = tomllib.loads(uncommented)["events"]
    assert events == [{"name": "transaction.created", "scope": "READ:FINANCE"}]


def test_every_key_has_a_comment() -> None:
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+\s*=", line):
            commented = "#" in line.split("=", 1)[1] or lines[i - 1].startswith("#")
            assert commented, f"no comment for {line!r}"


def test_example_loads_to_the_built_in_defaults() -> None:
    config = load_config(EXAMPLE)
    assert config.source == str(EXAMPLE)
    assert config.events == ()
    assert dataclasses.replace(config, source="") == Config()
