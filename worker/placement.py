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
- **Locality.** A node without the model loaded, while a live node has it loaded, compares
  the expected wait for a warm slot (the model's queue times its average job time, over
  the warm nodes' slots) with the model's load cost on this node (measured from Ollama's
  ``load_duration``). If the warm nodes will drain the queue sooner, it leaves the jobs to
  them, claiming only jobs that waited ``locality_wait`` (the safety valve should the warm
  nodes stall); otherwise it claims at once and loads the model. A node that has another
  model loaded counts the load twice (it may evict that model, whose next job then needs
  a load too). A node that alone has some other model loaded counts it three times
  (``SOLE_FACTOR``: this load, the reload of its own model for that model's next job,
  and that job's wait for it), and while the model is warm nowhere it waits the load
  cost, so that nodes whose model is also loaded elsewhere load first (only while another
  live node serves the model: alone, it loads at once).
- **One loader at a time.** A node that claims a job of a model it does not have loaded
  names itself in Redis (``keys.loading``, for the load cost plus two heartbeats); the
  others count it as warm for that model (``loader``) until its heartbeat shows the
  model loaded. So a model warm nowhere (its only node died) is loaded by one node, not
  by every node with a free slot at once.

**Tail-aware claims** are a gate rather than a delay: each node measures its speed per
model (``eval_count / eval_duration`` of its answers). A node with faster peers for a
model leaves that model's jobs to them while the queue is short enough that they would
finish the last queued job sooner even after waiting for a slot: the faster nodes start
queued jobs at a rate proportional to ``sum(slots * speed)`` over them, so with ``Q`` jobs
queued this node claims only while ``Q > sum(slots_f * speed_f) * (1/speed - 1/fastest)``
(the job length cancels out), plus half a job: the faster slots free up at random
phases, the first after half a job on average, so the last queued job starts there
about ``Q - 0.5`` jobs later, not ``Q``. With nodes whose speeds are in whole ratios (1x,
2x, 4x) the plain threshold is a whole number, and the decision at ``Q`` equal to it
flipped with the noise of the measured speeds; half a job puts it between two queue
lengths. Once the backlog is that short the slow node idles, and the tail of a batch
runs on the fast nodes; should the backlog not move for twice the longest job time the
faster nodes report (at least a second), it claims anyway.

Peers are read from the node registry (their heartbeats); a peer counts only while it
heartbeats, its state is ``running`` (breaker closed) and it serves the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from corral.names import normalize_model

SPEED_SMOOTHING = 0.3
"""Weight of the newest measurement in the moving average of a node's speed."""
MIN_PATIENCE = 1.0
"""Least seconds a slow node waits on faster nodes that take none of a short backlog."""
SOLE_FACTOR = 3.0
"""Load costs a node that alone has another model loaded weighs a load against: this
load, the reload of that model for its next job, and that job's wait for it."""
TAIL_MARGIN = 0.5
"""Jobs added to the tail threshold: the expected phase of the faster nodes' next free
slot, in jobs (see the module docstring)."""
FASTER = 1.1
"""A peer counts as faster only above this ratio: measurement noise must not make
equal nodes defer to each other."""


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
    speeds: dict[str, float] = field(default_factory=dict)
    """Measured generation speed per model here, tokens/s (a moving average)."""
    durations: dict[str, float] = field(default_factory=dict)
    """Measured seconds per job per model here, load excluded (a moving average)."""

    def note_duration(self, model: str, seconds: float) -> None:
        if seconds <= 0:
            return
        last = self.durations.get(model)
        self.durations[model] = (
            seconds if last is None else last + SPEED_SMOOTHING * (seconds - last)
        )

    def note_speed(self, model: str, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        speed = tokens / seconds
        last = self.speeds.get(model)
        self.speeds[model] = speed if last is None else last + SPEED_SMOOTHING * (speed - last)

    def tail_threshold(self, model: str, peers: Iterable[dict[str, Any]]) -> float:
        """Queue length at or below which faster peers should take ``model``'s jobs
        (0 when no live peer is known to be faster)."""
        mine = self.speeds.get(model)
        if not mine:
            return 0.0
        capacity = 0.0
        fastest = mine
        for peer in peers:
            if peer.get("node_id") == self.node_id or peer.get("state") != "running":
                continue
            speed = float((peer.get("speeds") or {}).get(model) or 0)
            if speed <= mine * FASTER or model not in _names(peer.get("models")):
                continue
            capacity += int(peer.get("slots_total") or 0) * speed
            fastest = max(fastest, speed)
        if not capacity:
            return 0.0
        return capacity * (1 / mine - 1 / fastest) + TAIL_MARGIN

    def tail_patience(self, model: str, peers: Iterable[dict[str, Any]]) -> float:
        """Seconds a short backlog left to faster nodes may go without one of its jobs
        taken before this node takes them anyway: twice the longest job time the faster
        nodes report, at least ``MIN_PATIENCE``."""
        mine = self.speeds.get(model, 0.0)
        times = [
            float(took)
            for peer in peers
            if peer.get("node_id") != self.node_id and peer.get("state") == "running"
            if float((peer.get("speeds") or {}).get(model) or 0) > mine * FASTER
            if isinstance(took := (peer.get("durations") or {}).get(model), int | float)
        ]
        return max(MIN_PATIENCE, 2 * max(times, default=0.0))

    def note_load(self, model: str, seconds: float) -> None:
        self.load_costs[model] = seconds

    def warm_elsewhere(
        self,
        model: str,
        *,
        loaded_here: bool,
        peers: Iterable[dict[str, Any]],
        loader: str | None = None,
    ) -> bool:
        """Whether locality matters: the model is not loaded here but on a live peer (or
        ``loader``, a live peer that is loading it)."""
        if loaded_here or self.locality_wait <= 0:
            return False
        return any(_warm(peer, model, self.node_id, loader) for peer in peers)

    def delay(
        self,
        model: str,
        *,
        loaded_here: bool,
        peers: Iterable[dict[str, Any]],
        queued: int = 0,
        holding: Iterable[str] = (),
        loader: str | None = None,
    ) -> float:
        """Seconds a job of ``model`` must have waited before this node claims it;
        ``queued``: the model's jobs waiting (read when ``warm_elsewhere``); ``holding``:
        the models loaded here; ``loader``: the node loading ``model`` (``keys.loading``),
        counted as warm for it."""
        peers = list(peers)
        delay = 0.0
        warm_slots = 0
        warm_times: list[float] = []
        higher = 0
        free_primary = False
        others = False  # another live node serves the model: it could load it instead
        for peer in peers:
            if peer.get("node_id") == self.node_id or peer.get("state") != "running":
                continue
            if model not in _names(peer.get("models")):
                continue
            others = True
            if not loaded_here and _warm(peer, model, self.node_id, loader):
                warm_slots += int(peer.get("slots_total") or 0)
                took = (peer.get("durations") or {}).get(model)
                if isinstance(took, int | float) and took > 0:
                    warm_times.append(float(took))
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
        if loaded_here or self.locality_wait <= 0:
            return delay
        cost = self.load_costs.get(model, self.load_cost)
        # Loading may evict a model this node alone has loaded: its next jobs would pay a
        # load too, so such a node loads another model last.
        sole = any(
            held != model and not any(_warm(peer, held, self.node_id) for peer in peers)
            for held in holding
        )
        if warm_slots:
            took = _job_time(warm_times, peers, self.durations, model)
            # A load that evicts another model is likely paid twice: that model's next
            # job needs a load too. If no other node has that model, surely so, and that
            # job waits for the reload besides.
            if sole:
                cost *= SOLE_FACTOR
            elif any(held != model for held in holding):
                cost *= 2
            if took is None or queued * took / warm_slots <= cost:
                delay = max(delay, self.locality_wait)
        elif sole and others:
            delay = max(delay, min(self.locality_wait, cost))
        return delay


def _job_time(
    warm: list[float], peers: list[dict[str, Any]], mine: dict[str, float], model: str
) -> float | None:
    """Seconds a job of ``model`` takes: as the warm nodes measured it, else as this node
    did, else the mean of every job time any node reports; None when nothing is known
    (a fleet just started: better wait than load on a guess)."""
    if warm:
        return sum(warm) / len(warm)
    if model in mine:
        return mine[model]
    known = [
        float(took)
        for peer in peers
        for took in (peer.get("durations") or {}).values()
        if isinstance(took, int | float) and took > 0
    ] + list(mine.values())
    return sum(known) / len(known) if known else None


def _warm(peer: dict[str, Any], model: str, me: str, loader: str | None = None) -> bool:
    node = peer.get("node_id")
    return (
        node != me
        and peer.get("state") == "running"
        and (node == loader or model in _names(peer.get("loaded")))
        and model in _names(peer.get("models"))
    )


def _names(entries: Any) -> set[str]:
    return {
        normalize_model(str(e.get("name") or e.get("model")))
        for e in entries or ()
        if isinstance(e, dict)
    }
