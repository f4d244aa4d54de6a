"""How long a node leaves a model's jobs to better placed nodes before it claims them.

Corral pulls: a node with a free slot claims. Placement is therefore a delay, not a
choice made by a router: a node that another node would serve better claims only jobs
that have waited ``claim_delay`` seconds (the claim script compares each job's enqueue
time, on Redis's clock, with that age). A better placed node with a free slot takes
the job first; if none does within the delay, this node does, so no job waits on a
preference longer than its delay. The reasons, added up:

- **Backup.** A backup node waits ``spill_after`` while any primary node serving the
  model has a free slot; with every primary saturated it claims at once.
- **Weight.** ``weight_step`` per free node of the same class (primary or backup) with
  a higher weight.
- **Locality.** A node without the model loaded, while a live node has it loaded, waits
  the model's load cost on this node (measured from Ollama's ``load_duration``), capped by
  ``locality_wait``: the ski-rental rule, so a job never waits for a warm slot longer
  than loading the model here would have taken.

Peers are read from the node registry (their heartbeats); a peer counts only while it
heartbeats, its state is ``running`` (breaker closed) and it serves the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from corral.names import normalize_model


@dataclass(slots=True)
class Placement:
    node_id: str
    weight: int = 1
    backup: bool = False
    weight_step: float = 0.05
    spill_after: float = 2.0
    locality_wait: float = 10.0
    load_cost: float = 5.0
    load_costs: dict[str, float] = field(default_factory=dict)
    """Measured seconds to load each model here (the last ``load_duration`` seen)."""

    def note_load(self, model: str, seconds: float) -> None:
        self.load_costs[model] = seconds

    def delay(self, model: str, *, loaded_here: bool, peers: Iterable[dict[str, Any]]) -> float:
        """Seconds a job of ``model`` must have waited before this node claims it."""
        delay = 0.0
        warm_elsewhere = False
        higher = 0
        free_primary = False
        for peer in peers:
            if peer.get("node_id") == self.node_id or peer.get("state") != "running":
                continue
            if model not in _names(peer.get("models")):
                continue
            if not loaded_here and model in _names(peer.get("loaded")):
                warm_elsewhere = True
            free = int(peer.get("slots_busy") or 0) < int(peer.get("slots_total") or 0)
            if not free:
                continue
            peer_backup = bool(peer.get("backup"))
            if not peer_backup:
                free_primary = True
            if peer_backup == self.backup and int(peer.get("weight") or 1) > self.weight:
                higher += 1
        if self.backup and free_primary:
            delay += self.spill_after
        delay += higher * self.weight_step
        if warm_elsewhere and self.locality_wait > 0:
            delay = max(delay, min(self.load_costs.get(model, self.load_cost), self.locality_wait))
        return delay


def _names(entries: Any) -> set[str]:
    return {
        normalize_model(str(e.get("name") or e.get("model")))
        for e in entries or ()
        if isinstance(e, dict)
    }
