"""The README documents every setting and every subcommand that exists."""

from __future__ import annotations

import re
from pathlib import Path

from corral.cli import COMMANDS
from corral.settings import GatewaySettings, SchedulerSettings, WorkerSettings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_every_setting_has_a_row_in_the_configuration_table() -> None:
    names = {
        name
        for settings in (GatewaySettings, WorkerSettings, SchedulerSettings)
        for name in settings.model_fields
    }
    rows = set(re.findall(r"^\| `CORRAL_([A-Z0-9_]+)`", README, flags=re.MULTILINE))
    assert sorted(n.upper() for n in names) == sorted(rows & {n.upper() for n in names})
    assert rows <= {n.upper() for n in names}  # and no row for a setting that is gone


def test_every_subcommand_is_in_the_command_line_summary() -> None:
    found = re.search(r"\*\*Command line\*\*: `corral ([^`]+)`", README)
    assert found is not None, "README lost its **Command line** summary"
    listed = [word.strip() for word in found.group(1).replace("\n", " ").split("|")]
    assert listed == list(COMMANDS)
