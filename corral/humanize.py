"""Heartbeat fields as people read them, for ``corral status`` and the status page."""

from __future__ import annotations

from typing import Any

GIB = 1024**3


def model_names(entries: Any) -> list[str]:
    """Names from a list of ``/api/tags`` or ``/api/ps`` entries."""
    if not isinstance(entries, list):
        return []
    return [str(e.get("name") or e.get("model")) for e in entries if isinstance(e, dict)]


def percent(value: Any) -> str:
    return f"{float(value):.0f}%" if isinstance(value, int | float) else "-"


def memory(mem: Any) -> str:
    if not isinstance(mem, dict) or "percent" not in mem:
        return "-"
    return f"{percent(mem['percent'])} of {float(mem.get('total', 0)) / GIB:.1f} GiB"


def gpus(entries: Any) -> str:
    if not isinstance(entries, list) or not entries:
        return "-"
    return ", ".join(
        f"{g.get('name', '?')} {percent(g.get('util_percent'))} "
        f"{float(g.get('mem_used', 0)) / GIB:.1f}/{float(g.get('mem_total', 0)) / GIB:.1f} GiB"
        for g in entries
        if isinstance(g, dict)
    )
