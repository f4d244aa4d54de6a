"""Benchmark 7, placement: tail-aware claims on uneven nodes, and model locality.

**Uneven nodes.** 120 equal streamed generates, all sent at once, on three fake nodes of
speed 1x, 2x and 4x (two slots each). The ideal makespan is total work over total
capacity; a pull system that lets the slow node take the last jobs finishes late. Run
twice: tail-aware claims on (the default) and off (``--no-tail-aware``).

**Locality.** Three models on four nodes (one loaded model each, ``--max-loaded-models
1``, a load delay), 1,000 mixed jobs in bursts. Every model starts loaded somewhere, so
the minimum number of loads is 0. Run with model locality on (the default) and off
(``--locality-wait 0``: only the older hot-models-first claim order remains).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import report
from bench_scheduling import Job, Outcome, _fake_stats, _one
from fleetctl import FakeSpec, Fleet, Node, raise_nofile
from httpload import run_uvloop

UNEVEN_RATES = [20.0, 40.0, 80.0]  # tokens/s per slot: 1x, 2x, 4x
UNEVEN_SLOTS = 2
UNEVEN_TOKENS = 40

LOCAL_MODELS = ["alpha:7b", "beta:7b", "gamma:7b"]
LOCAL_POPULARITY = [0.5, 0.3, 0.2]
LOCAL_PRELOAD = [0, 1, 2, 0]  # the model each node starts with
LOCAL_LOAD_DELAY = 1.0
LOCAL_RATE = 400.0
SEED = 20261129


async def _replay(url: str, jobs: list[Job], nodes: list[Node], cap: float) -> dict[str, Any]:
    outcomes = [Outcome(j) for j in jobs]
    t0 = time.perf_counter() + 0.2
    tasks = [asyncio.create_task(_one(url, j, o, t0)) for j, o in zip(jobs, outcomes, strict=True)]
    _, late = await asyncio.wait(tasks, timeout=cap)
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    stats = {node.node_id: await _fake_stats(node) for node in nodes}
    return {"outcomes": outcomes, "nodes": stats}


def _corral(
    name: str, specs: list[FakeSpec], worker_args: list[str], jobs: list[Job], cap: float
) -> dict[str, Any]:
    with Fleet(name) as fleet:
        fleet.start_redis()
        nodes = [
            fleet.add_node(f"n{i + 1}", spec, worker_args=worker_args, wait=False)
            for i, spec in enumerate(specs)
        ]
        for node in nodes:
            fleet.wait_worker(node)
        fleet.start_gateway(expect_nodes=len(nodes))
        fleet.start_scheduler()
        time.sleep(2.5)  # every worker reads its peers' heartbeats (placement needs them)
        result: dict[str, Any] = run_uvloop(lambda: _replay(fleet.gateway_url, jobs, nodes, cap))
        return result


def _summary(res: dict[str, Any], ideal: float) -> dict[str, Any]:
    outcomes: list[Outcome] = res["outcomes"]
    ok = [o for o in outcomes if o.ok]
    start = min(o.sent for o in outcomes)
    makespan = max((o.done for o in ok), default=float("nan")) - start
    return {
        "jobs": len(outcomes),
        "failed": len(outcomes) - len(ok),
        "makespan": makespan,
        "ideal": ideal,
        "ratio": makespan / ideal if ideal else float("nan"),
        "loads": sum(n["loads"] for n in res["nodes"].values()),
        "spread": {k: v["requests"] for k, v in sorted(res["nodes"].items())},
    }


def uneven(smoke: bool) -> dict[str, dict[str, Any]]:
    count = 30 if smoke else 120
    jobs = [Job(i, 0.0, "bench:latest", UNEVEN_TOKENS) for i in range(count)]
    specs = [
        FakeSpec(num_parallel=UNEVEN_SLOTS, token_rate=rate, preload=["bench:latest"])
        for rate in UNEVEN_RATES
    ]
    ideal = count * UNEVEN_TOKENS / (UNEVEN_SLOTS * sum(UNEVEN_RATES))
    results = {}
    for label, args in (("tail-aware (default)", []), ("tail-aware off", ["--no-tail-aware"])):
        res = _corral("placement-uneven", specs, args, jobs, cap=ideal * 6)
        results[label] = _summary(res, ideal)
    return results


def locality(smoke: bool) -> dict[str, dict[str, Any]]:
    rng = random.Random(SEED)
    count = 200 if smoke else 1000
    jobs: list[Job] = []
    t = 0.0
    while len(jobs) < count:
        for _ in range(min(rng.randint(40, 120), count - len(jobs))):
            model = rng.choices(LOCAL_MODELS, LOCAL_POPULARITY)[0]
            jobs.append(Job(len(jobs), t + rng.uniform(0, 0.3), model, rng.randint(5, 30)))
        t += rng.uniform(0.3, 1.2)
    jobs.sort(key=lambda j: j.at)
    specs = [
        FakeSpec(
            models=LOCAL_MODELS,
            num_parallel=2,
            max_loaded_models=1,
            load_delay=LOCAL_LOAD_DELAY,
            token_rate=LOCAL_RATE,
            preload=[LOCAL_MODELS[m]],
            max_queue=4096,
        )
        for m in LOCAL_PRELOAD
    ]
    ideal = sum(j.tokens for j in jobs) / (2 * LOCAL_RATE * len(specs))
    results = {}
    for label, args in (("locality on (default)", []), ("locality off", ["--locality-wait", "0"])):
        res = _corral("placement-locality", specs, args, jobs, cap=120.0)
        results[label] = _summary(res, ideal)
    return results


def run(smoke: bool) -> report.Result:
    raise_nofile()
    tails = uneven(smoke)
    local = locality(smoke)
    goals = report.Goals()
    md = [
        "## 9. Placement: uneven nodes and model locality",
        "",
        f"**Uneven nodes.** {tails['tail-aware (default)']['jobs']} equal streamed generates "
        f"of {UNEVEN_TOKENS} tokens sent at once to three fake nodes of "
        f"{', '.join(f'{r:g}' for r in UNEVEN_RATES)} tokens/s per slot (1x, 2x, 4x), "
        f"{UNEVEN_SLOTS} slots each, every node with the model loaded. Ideal makespan: "
        "total work over total capacity.",
        "",
        report.table(
            ["run", "makespan s", "ideal s", "vs ideal", "jobs n1 / n2 / n4 (1x/2x/4x)", "failed"],
            [
                [
                    f"**{label}**",
                    f"{s['makespan']:.2f}",
                    f"{s['ideal']:.2f}",
                    f"{s['ratio']:.3f}x",
                    " / ".join(str(v) for v in s["spread"].values()),
                    s["failed"],
                ]
                for label, s in tails.items()
            ],
        ),
        "",
        "Jobs per node in proportion to speed would be 1/7, 2/7, 4/7 of them.",
        "",
        goals.check(
            "uneven nodes: makespan vs ideal (tail-aware)",
            tails["tail-aware (default)"]["ratio"],
            1.05,
            "x",
            lower_is_better=True,
        ),
        "",
        f"**Locality.** {local['locality on (default)']['jobs']} streamed generates of 5-30 "
        f"tokens in bursts, models {', '.join(f'`{m}`' for m in LOCAL_MODELS)} "
        f"({', '.join(f'{p:.0%}' for p in LOCAL_POPULARITY)}), on four nodes of 2 slots at "
        f"{LOCAL_RATE:g} tokens/s, `--max-loaded-models 1`, `--load-delay "
        f"{LOCAL_LOAD_DELAY:g}`, each starting with one model loaded "
        f"({', '.join(LOCAL_MODELS[m] for m in LOCAL_PRELOAD)}): the minimum number of loads "
        "is 0. Locality off is `CORRAL_LOCALITY_WAIT=0` (the worker still claims loaded "
        "models first, as before this feature).",
        "",
        report.table(
            ["run", "model loads", "makespan s", "ideal s", "jobs per node", "failed"],
            [
                [
                    f"**{label}**",
                    s["loads"],
                    f"{s['makespan']:.2f}",
                    f"{s['ideal']:.2f}",
                    " / ".join(str(v) for v in s["spread"].values()),
                    s["failed"],
                ]
                for label, s in local.items()
            ],
        ),
    ]
    for label, s in {**tails, **local}.items():
        goals.info(
            f"placement: {label}",
            f"makespan {s['ratio']:.2f}x ideal, {s['loads']} loads, {s['failed']} failed",
        )
    if smoke:
        md.insert(1, "\n_Smoke run: fewer jobs, numbers are indicative only._")
    return {
        "name": "placement",
        "markdown": "\n".join(md),
        "summary": goals.rows,
        "data": {"uneven": tails, "locality": local},
    }


def main() -> int:
    return report.main(__doc__ or "", lambda args: run(args.smoke))


if __name__ == "__main__":
    raise SystemExit(main())
