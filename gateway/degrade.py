"""What the degradation level and the measured wait do to a request, before it is queued.

``corral.load.LoadReport`` is the active scheduler's latest word on the fleet's load,
held by the gateway's fleet view; nothing here reads Redis. At level 0 a request only
compares two numbers (the global queue bound, and its wait limit when it has one).

* level 1 (minor): ``num_predict`` is capped for degradable priorities;
* level 2 (major): heavy models are also mapped to light ones (``degrade_models``);
* level 3 (critical): the least urgent priorities are also refused, with a
  ``Retry-After`` from the measured drain rate.

Each change made is recorded in the job spec's ``degraded`` (the ``X-Corral-Degraded``
header of the answer).
"""

from __future__ import annotations

from typing import Any

from corral.errors import Overloaded, QueueFull, WaitTooLong
from corral.fleet import Fleet
from corral.keys import JobKind
from corral.load import LoadReport
from corral.settings import GatewaySettings


def shed(report: LoadReport, priority: int, settings: GatewaySettings) -> None:
    """Refuse a request the level says to shed (level 3, priority not urgent enough)."""
    if report.level >= 3 and priority >= settings.shed_priority:
        raise Overloaded(
            f"server overloaded (degradation level {report.level}): requests of priority "
            f"{settings.shed_priority} to 9 are refused for now, please try again later",
            retry_after=report.retry_after,
        )


def degrade(
    body: dict[str, Any],
    kind: JobKind,
    model: str,
    priority: int,
    report: LoadReport,
    settings: GatewaySettings,
    fleet: Fleet,
) -> tuple[str, str]:
    """Apply levels 1 and 2 to ``body`` (in place); returns the model to run and what was
    changed, for the ``X-Corral-Degraded`` header (empty when nothing was)."""
    level = report.level
    notes: list[str] = []
    if level >= 2 and priority >= settings.degrade_map_priority:
        light = settings.model_map().get(model)
        if light is not None and light != model and fleet.has_model(light):
            model = body["model"] = light
            notes.append(f"model={light}")
    if level >= 1 and kind.streams and priority >= settings.degrade_cap_priority:
        cap = settings.degrade_num_predict
        options = body.get("options")
        if not isinstance(options, dict):
            options = body["options"] = {}
        asked = options.get("num_predict")
        if isinstance(asked, bool) or not isinstance(asked, int | float):
            asked = -1  # none asked: Ollama's own default has no limit
        if asked < 0 or asked > cap:  # Ollama reads a negative num_predict as "no limit"
            options["num_predict"] = cap
            notes.append(f"num_predict={cap}")
    return model, ("; ".join([f"level={level}", *notes]) if notes else "")


def admit(
    report: LoadReport,
    model: str,
    priority: int,
    wait_limit: float | None,
    settings: GatewaySettings,
) -> None:
    """Refuse at once what the fleet cannot take: more queued jobs than the global bound,
    or a job whose expected queue wait is longer than it may wait."""
    if report.queued >= settings.max_queue_total:
        raise QueueFull(
            f"server busy, please try again. {report.queued} requests already queued "
            f"(limit {settings.max_queue_total})",
            retry_after=report.queued / report.rate if report.rate > 0 else None,
        )
    if wait_limit is None:
        return
    wait = report.queue_wait(model, priority)
    if wait is not None and wait > wait_limit:
        raise WaitTooLong(
            f"expected queue wait {wait:.1f}s is longer than the request's timeout of "
            f"{wait_limit:g}s; please try again later or with a longer timeout",
            model=model,
            wait=wait,
        )
