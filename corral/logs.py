"""Logging set-up for every Corral process: one line per event, lazy ``%s`` arguments."""

from __future__ import annotations

import logging


def configure(level: str, process: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s",
    )
