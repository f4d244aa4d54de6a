"""The circuit breaker's transitions and the claim delays of placement, on their own."""

from __future__ import annotations

from typing import Any

import pytest

from corral.errors import ConfigError
from corral.settings import WorkerSettings
from corral.worker.breaker import Breaker, BreakerState
from corral.worker.placement import Placement

MODEL = "llama3:latest"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _breaker(clock: Clock, threshold: int = 3) -> Breaker:
    return Breaker(threshold=threshold, window=10.0, cooldown=5.0, clock=clock)


def test_failures_within_the_window_open_the_breaker() -> None:
    clock = Clock()
    breaker = _breaker(clock)
    breaker.failed("a")
    breaker.failed("b")
    assert breaker.state is BreakerState.CLOSED and breaker.allowance(4) == 4
    breaker.failed("c")
    assert breaker.state is BreakerState.OPEN
    assert breaker.allowance(4) == 0
    assert breaker.report()["trips"] == 1 and breaker.report()["failures"] == 3


def test_failures_spread_wider_than_the_window_do_not_open_it() -> None:
    clock = Clock()
    breaker = _breaker(clock)
    for job in "abcde":
        breaker.failed(job)
        clock.now += 6.0  # two failures never fall within one 10 s window with a third
    assert breaker.state is BreakerState.CLOSED


def test_half_open_after_the_cooldown_allows_one_probe_and_its_success_closes() -> None:
    clock = Clock()
    breaker = _breaker(clock, threshold=1)
    breaker.failed("a")
    clock.now += 4.9
    assert breaker.state is BreakerState.OPEN and breaker.reopens_in() == pytest.approx(0.1)
    clock.now += 0.2
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allowance(4) == 1
    breaker.claimed("probe")
    assert breaker.allowance(4) == 0, "one probe at a time"
    breaker.succeeded("probe")
    assert breaker.state is BreakerState.CLOSED and breaker.allowance(4) == 4


def test_a_failed_probe_opens_it_again_for_a_full_cooldown() -> None:
    clock = Clock()
    breaker = _breaker(clock, threshold=1)
    breaker.failed("a")
    clock.now += 5.0
    breaker.claimed("probe")
    breaker.failed("probe")
    assert breaker.state is BreakerState.OPEN and breaker.reopens_in() == pytest.approx(5.0)
    assert breaker.trips == 2


def test_a_probe_with_no_verdict_lets_the_next_claim_probe() -> None:
    clock = Clock()
    breaker = _breaker(clock, threshold=1)
    breaker.failed("a")
    clock.now += 5.0
    breaker.claimed("probe")
    breaker.released("probe")  # cancelled or handed back: says nothing about the node
    assert breaker.state is BreakerState.HALF_OPEN and breaker.allowance(2) == 1


def test_a_late_failure_of_a_job_claimed_before_the_breaker_opened_does_not_extend_it() -> None:
    clock = Clock()
    breaker = _breaker(clock, threshold=1)
    breaker.failed("a")
    clock.now += 3.0
    breaker.failed("b")
    assert breaker.reopens_in() == pytest.approx(2.0)


def test_threshold_zero_never_opens() -> None:
    breaker = _breaker(Clock(), threshold=0)
    for job in "abcdefgh":
        breaker.failed(job)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.recent_failures() == 0  # off: no node counts as failing lately either


def _peer(node_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "state": "running",
        "models": [{"name": MODEL}],
        "loaded": [],
        "slots_total": 1,
        "slots_busy": 0,
        "weight": 1,
        "backup": False,
        **fields,
    }


def test_weight_delays_by_step_per_free_node_of_higher_weight() -> None:
    me = Placement("me", weight=1, weight_step=0.1)
    peers = [
        _peer("heavy", weight=10),
        _peer("heavier", weight=20),
        _peer("busy", weight=30, slots_busy=1),  # no free slot: does not hold us back
        _peer("light", weight=1),
        _peer("other-model", weight=50, models=[{"name": "qwen2:0.5b"}]),
        _peer("broken", weight=50, state="breaker-open"),
    ]
    assert me.delay(MODEL, loaded_here=True, peers=peers) == pytest.approx(0.2)
    top = Placement("top", weight=30, weight_step=0.1)
    assert top.delay(MODEL, loaded_here=True, peers=peers) == 0.0


def test_a_backup_waits_only_while_a_primary_has_a_free_slot() -> None:
    backup = Placement("spare", backup=True, spill_after=2.0)
    assert backup.delay(MODEL, loaded_here=True, peers=[_peer("p")]) == 2.0
    saturated = [_peer("p", slots_busy=1), _peer("other-backup", backup=True)]
    assert backup.delay(MODEL, loaded_here=True, peers=saturated) == 0.0
    primary = Placement("p2", weight=100)
    assert primary.delay(MODEL, loaded_here=True, peers=[_peer("spare", backup=True)]) == 0.0


def test_a_cold_node_loads_only_when_warm_nodes_would_drain_the_queue_slower() -> None:
    cold = Placement("cold", load_cost=2.0, locality_wait=10.0)
    # One warm node, 2 slots, 0.5 s a job: a queue of 8 drains in 2 s, the load cost.
    warm = [_peer("warm", loaded=[{"name": MODEL}], slots_total=2, durations={MODEL: 0.5})]
    assert cold.warm_elsewhere(MODEL, loaded_here=False, peers=warm)
    assert cold.delay(MODEL, loaded_here=False, peers=warm, queued=8) == 10.0  # leave them
    assert cold.delay(MODEL, loaded_here=False, peers=warm, queued=9) == 0.0  # load now
    cold.note_load(MODEL, 8.0)  # measured here: a load is dearer than thought
    assert cold.delay(MODEL, loaded_here=False, peers=warm, queued=9) == 10.0
    assert cold.delay(MODEL, loaded_here=True, peers=warm, queued=1) == 0.0
    assert not cold.warm_elsewhere(MODEL, loaded_here=False, peers=[_peer("also-cold")])
    assert cold.delay(MODEL, loaded_here=False, peers=[_peer("also-cold")], queued=1) == 0.0
    off = Placement("cold", locality_wait=0.0)
    assert off.delay(MODEL, loaded_here=False, peers=warm, queued=1) == 0.0
    unmeasured = [_peer("warm", loaded=[{"name": MODEL}], slots_total=2)]
    # No job time known anywhere (a fleet just started): wait rather than load on a guess.
    assert cold.delay(MODEL, loaded_here=False, peers=unmeasured, queued=100) == 10.0
    # Another model's job time is the best guess there is: 8 s load, 1 s jobs, 2 slots.
    other = [*unmeasured, _peer("x", durations={"qwen2:0.5b": 1.0})]
    assert cold.delay(MODEL, loaded_here=False, peers=other, queued=16) == 10.0
    assert cold.delay(MODEL, loaded_here=False, peers=other, queued=17) == 0.0


def test_a_node_alone_holding_a_model_weighs_a_load_three_times() -> None:
    node = Placement("me", load_cost=2.0, locality_wait=10.0)
    warm = [_peer("warm", loaded=[{"name": MODEL}], slots_total=1, durations={MODEL: 1.0})]
    # Nothing else loaded here: a queue of 3 s outlasts one 2 s load.
    assert node.delay(MODEL, loaded_here=False, peers=warm, queued=3) == 0.0
    # Alone with b:latest loaded: this load, b's reload and its job's wait, 3 x 2 s.
    held = ["b:latest"]
    assert node.delay(MODEL, loaded_here=False, peers=warm, queued=6, holding=held) == 10.0
    assert node.delay(MODEL, loaded_here=False, peers=warm, queued=7, holding=held) == 0.0
    shared = [*warm, _peer("twin", models=[{"name": "b:latest"}], loaded=[{"name": "b:latest"}])]
    # Not alone with b:latest, but a load may evict it: the load counts twice (2 x 2 s).
    assert node.delay(MODEL, loaded_here=False, peers=shared, queued=4, holding=held) == 10.0
    assert node.delay(MODEL, loaded_here=False, peers=shared, queued=5, holding=held) == 0.0
    # Warm nowhere: someone must load it; a sole holder lets the others go first.
    cold = [_peer("cold")]
    assert node.delay(MODEL, loaded_here=False, peers=cold, queued=5, holding=held) == 2.0
    assert node.delay(MODEL, loaded_here=False, peers=cold, queued=5) == 0.0
    # No other node serves the model: nobody else could load it, so waiting gains nothing.
    assert node.delay(MODEL, loaded_here=False, peers=[], queued=5, holding=held) == 0.0


def test_a_node_loading_the_model_counts_as_warm_until_its_heartbeat_shows_it() -> None:
    node = Placement("me", load_cost=2.0, locality_wait=10.0)
    # Warm nowhere (its only node died): every free node would load it at once...
    peers = [_peer("loader", slots_total=2, durations={MODEL: 0.5}), _peer("idle")]
    assert not node.warm_elsewhere(MODEL, loaded_here=False, peers=peers)
    assert node.delay(MODEL, loaded_here=False, peers=peers, queued=4) == 0.0
    # ...unless one says it is loading it: then the others leave it a short queue.
    assert node.warm_elsewhere(MODEL, loaded_here=False, peers=peers, loader="loader")
    assert node.delay(MODEL, loaded_here=False, peers=peers, queued=4, loader="loader") == 10.0
    # A long one they share (4 x 0.5 s / 2 slots = 1 s < 2 s; 10 x 0.5 s / 2 = 2.5 s > 2 s).
    assert node.delay(MODEL, loaded_here=False, peers=peers, queued=10, loader="loader") == 0.0
    # The loader names itself, a dead node or one whose breaker is open: no one is warm.
    assert node.delay(MODEL, loaded_here=False, peers=peers, queued=4, loader="me") == 0.0
    assert node.delay(MODEL, loaded_here=False, peers=peers, queued=4, loader="gone") == 0.0
    broken = [_peer("loader", state="breaker-open", durations={MODEL: 0.5})]
    assert node.delay(MODEL, loaded_here=False, peers=broken, queued=4, loader="loader") == 0.0


def test_model_options_must_be_reload_options_per_model() -> None:
    ok = WorkerSettings.build(model_options='{"llama3": {"num_ctx": 8192}}')
    assert ok.forced_options() == {"llama3": {"num_ctx": 8192}}
    for bad in ("[1]", "{", '{"llama3": {"temperature": 0}}', '{"llama3": 3}'):
        with pytest.raises(ConfigError, match="CORRAL_MODEL_OPTIONS"):
            WorkerSettings.build(model_options=bad)


def test_a_slow_node_leaves_a_short_backlog_to_faster_nodes() -> None:
    # Speeds 1x, 2x and 4x, two slots each (the uneven-nodes benchmark's fleet).
    peers = [
        _peer("x1", slots_total=2, speeds={MODEL: 10.0}),
        _peer("x2", slots_total=2, speeds={MODEL: 20.0}),
        _peer("x4", slots_total=2, speeds={MODEL: 40.0}),
    ]
    slow = Placement("x1")
    assert slow.tail_threshold(MODEL, peers) == 0.0, "its own speed is not measured yet"
    slow.note_speed(MODEL, 100, 10.0)
    # Faster nodes start 2*20 + 2*40 = 120 tokens/s of work; this one would be 1/10 -
    # 1/40 s per token slower: 9 jobs, plus half a job for the phase of the faster nodes'
    # next free slot. A queue of 9 or fewer goes to them.
    assert slow.tail_threshold(MODEL, peers) == pytest.approx(9.5)
    middle = Placement("x2")
    middle.note_speed(MODEL, 200, 10.0)
    assert middle.tail_threshold(MODEL, peers) == pytest.approx(2.5)
    fast = Placement("x4")
    fast.note_speed(MODEL, 400, 10.0)
    assert fast.tail_threshold(MODEL, peers) == 0.0
    dead = [{**p, "state": "breaker-open"} for p in peers]
    assert slow.tail_threshold(MODEL, dead) == 0.0, "only running nodes are waited for"


def test_a_queue_as_long_as_the_plain_threshold_goes_to_faster_nodes_despite_noise() -> None:
    # The 2x node sees 2 jobs queued while the 4x nodes are about to free their slots: it
    # would finish one a full job time from now, they within that on average. Measured
    # speeds a little off (40.5 here, 79 there) put the plain threshold at 1.95, under 2.
    middle = Placement("x2")
    middle.note_speed(MODEL, 405, 10.0)
    peers = [_peer("x4", slots_total=2, speeds={MODEL: 79.0})]
    threshold = middle.tail_threshold(MODEL, peers)
    assert 2 < threshold < 3, "two jobs queued are left to the faster node, three are not"


def test_patience_with_faster_nodes_is_twice_their_longest_job() -> None:
    node = Placement("slow")
    assert node.tail_patience(MODEL, []) == 1.0
    node.note_speed(MODEL, 10, 1.0)
    peers = [
        _peer("a", durations={MODEL: 3.0}, speeds={MODEL: 20.0}),
        _peer("b", durations={MODEL: 0.2}, speeds={MODEL: 40.0}),
        _peer("slower", durations={MODEL: 9.0}, speeds={MODEL: 5.0}),
    ]
    assert node.tail_patience(MODEL, peers) == 6.0


def test_speed_is_a_moving_average_and_ignores_empty_measurements() -> None:
    node = Placement("n")
    node.note_speed(MODEL, 100, 1.0)
    node.note_speed(MODEL, 0, 1.0)
    node.note_speed(MODEL, 200, 1.0)
    assert node.speeds[MODEL] == pytest.approx(130.0)
