"""Compare checkouts of Corral in one sitting: overhead, throughput and a timed generation.

A machine's speed drifts between sittings (and within one), so two versions are compared
only when measured alternately: each round runs every build once, and the table gives
the median over rounds with the spread. Each build is a checkout with its own ``.venv``
(``make venv`` in it) and runs its own ``bench/bench_overhead.py --smoke`` and
``bench/bench_throughput.py --smoke``; ``bench/generation_load.py`` (this checkout's)
runs in each build's directory against that build's fleet helpers.

Every build meets the same fake Ollama, the one of ``--fake-from`` (default: this
checkout), through ``CORRAL_BENCH_FAKE``: the fake shares the machine's cores, and what
it costs is not Corral's. A build whose ``bench/fleetctl.py`` predates that variable
needs it added by hand (one line: see ``fleetctl.fake_argv``), or it runs its own fake.

    python bench/compare_builds.py --build before=PATH --build after=. [--rounds 5]
        [--fake-from PATH] [--no-generation] [--out DIR]

The first build is the baseline the changes are given against.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
from fleetctl import FAKE_COMMAND_ENV

HERE = Path(__file__).resolve().parent
CLIENTS = (64, 512, 2048)


def python_of(build: Path) -> Path:
    return build / ".venv" / "bin" / "python"


def run_json(build: Path, argv: list[str], out: Path, env: dict[str, str]) -> Any:
    """Run ``argv`` with the build's Python in its directory; its ``--json`` result."""
    done = subprocess.run(
        [str(python_of(build)), *argv, "--json", str(out)],
        cwd=build,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    if done.returncode != 0 or not out.exists():
        tail = done.stderr.decode(errors="replace")[-2000:]
        raise SystemExit(f"{argv[0]} failed in {build} (exit {done.returncode}):\n{tail}")
    return orjson.loads(out.read_bytes())


def figures(overhead: Any, throughput: Any, generation: Any | None) -> dict[str, float]:
    """One round of one build, as named figures."""
    data = overhead["data"]
    found = {
        "added p50 ms": data["added_p50_s"] * 1e3,
        "added p99 ms": data["added_p99_s"] * 1e3,
    }
    for row in throughput["data"]["rows"]:
        label = row["label"]
        if label.startswith("direct"):
            found["fake alone req/s"] = row["rate"]
            continue
        clients = int(label.split(",")[1].split()[0])
        found[f"req/s, {clients} clients"] = row["rate"]
        if clients == 512 and row["completed"]:
            for proc, cpu in row["cpu"].items():
                if proc in ("gateway", "redis") or proc.startswith(("worker", "fake")):
                    name = proc.split("-")[0]
                    found[f"CPU µs/req at 512, {name}"] = cpu / row["completed"] * 1e6
    if generation is not None:
        found["generation: req/s"] = generation["corral"]["rate"]
        found["generation: added p50 ms"] = generation["added_p50"] * 1e3
    return found


def measure(
    builds: dict[str, Path], rounds: int, fake: Path, generation: bool, out: Path
) -> dict[str, dict[str, list[float]]]:
    env = {
        **os.environ,
        FAKE_COMMAND_ENV: f"{python_of(fake)} -P -m corral.cli",
    }
    results: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in builds}
    for n in range(1, rounds + 1):
        for name, build in builds.items():
            stem = f"{name}-{n}"  # a build's name may hold dots: no with_suffix
            overhead = run_json(
                build,
                ["bench/bench_overhead.py", "--smoke", "--no-profile"],
                out / f"{stem}.overhead.json",
                env,
            )
            throughput = run_json(
                build,
                ["bench/bench_throughput.py", "--smoke", "--no-profile"],
                out / f"{stem}.throughput.json",
                env,
            )
            timed = (
                run_json(build, [str(HERE / "generation_load.py")], out / f"{stem}.gen.json", env)
                if generation
                else None
            )
            for figure, value in figures(overhead, throughput, timed).items():
                results[name][figure].append(value)
            print(f"{time.strftime('%H:%M:%S')} round {n}/{rounds}: {name} measured", flush=True)
    return results


def table(results: dict[str, dict[str, list[float]]]) -> str:
    names = list(results)
    base = results[names[0]]
    order = list(base)
    lines = [
        "| figure (median of rounds) | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for figure in order:
        cells = []
        for name in names:
            values = results[name].get(figure, [])
            if not values:
                cells.append("n/a")
                continue
            mid = statistics.median(values)
            cell = _fmt(mid)
            if name != names[0] and base.get(figure):
                change = mid / statistics.median(base[figure]) - 1
                cell += f" ({change:+.0%})"
            cell += f" <br>{_fmt(min(values))} to {_fmt(max(values))}" if len(values) > 1 else ""
            cells.append(cell)
        lines.append(f"| {figure} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build", action="append", required=True, help="NAME=PATH, in order")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--fake-from", type=Path, default=HERE.parent, help="checkout of the fake")
    p.add_argument("--no-generation", action="store_true", help="skip generation_load.py")
    p.add_argument("--out", type=Path, help="keep each run's JSON here")
    args = p.parse_args()
    builds: dict[str, Path] = {}
    for spec in args.build:
        name, _, path = spec.partition("=")
        if not name or not path:
            p.error(f"--build takes NAME=PATH, not {spec!r}")
        builds[name] = Path(path).resolve()
    out = args.out or Path(tempfile.mkdtemp(prefix="corral-compare-"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results = measure(builds, args.rounds, args.fake_from.resolve(), not args.no_generation, out)
    print(f"\n{args.rounds} rounds, {started} to {time.strftime('%H:%M:%S %Z')}; runs in {out}\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
