"""The audit log's writer: one JSON line per decision, to a file or standard error.

The gateway writes a line per routing decision, refusal and admin request
(``corral.gateway.audit``); ``corral keys`` writes one per change it makes.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson


class AuditLog:
    def __init__(self, target: str) -> None:
        self.log = logging.getLogger("corral.audit")
        self.log.propagate = False  # audit lines are not application logs
        self.log.setLevel(logging.INFO)
        self.handler: logging.Handler = (
            logging.StreamHandler(sys.stderr) if target == "-" else logging.FileHandler(target)
        )
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self.log.addHandler(self.handler)

    def write(self, fields: dict[str, Any]) -> None:
        self.log.info(orjson.dumps({"ts": round(time.time(), 3), **fields}).decode())

    def close(self) -> None:
        self.log.removeHandler(self.handler)
        self.handler.close()
