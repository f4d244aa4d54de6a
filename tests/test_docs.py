"""The README documents every setting and every subcommand that exists."""

from __future__ import annotations

from pathlib import Path

from corral.cli import COMMANDS
from corral.settings import GatewaySettings, SchedulerSettings, WorkerSettings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_in_the_configuration_table() -> None:
    names = {
        name
        for settings in (GatewaySettings, WorkerSettings, SchedulerSettings)
        for name in settings.model_fields
    }
    missing = sorted(n for n in names if f"`CORRAL_{n.upper()}`" not in README)
    assert missing == []


def test_every_subcommand_is_documented() -> None:
    assert all(f"{name}" in README for name in COMMANDS)
