"""What every benchmark shares: its command line, the machine description, tables,
profiles, and the JSON result file that ``run_all.py`` turns into RESULTS.md."""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import psutil
from fleetctl import OUT_DIR, Proc

Result = dict[str, Any]


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="a seconds-long version (for CI)")
    p.add_argument("--json", type=Path, help="write the result here (run_all does this)")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    return p


def main(description: str, run: Callable[[argparse.Namespace], Result]) -> int:
    """A benchmark script's entry point: the common flags, the run, its result written."""
    args = parser(description).parse_args()
    emit(run(args), args.json)
    return 0


def emit(result: Result, path: Path | None) -> None:
    data = orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    print(result.get("markdown", ""))


# ------------------------------------------------------------------------------- machine


def machine() -> dict[str, str]:
    cpu = platform.processor() or ""
    with open_quiet("/proc/cpuinfo") as text:
        for line in text.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    redis_version = "?"
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    with _quiet():
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
        redis_version = next(
            (p.split("=", 1)[1] for p in out.stdout.split() if p.startswith("v=")), out.stdout
        )
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram_gib": f"{psutil.virtual_memory().total / 2**30:.1f}",
        "python": platform.python_version(),
        "redis": redis_version,
        "os": f"{platform.system()} {platform.release()}",
    }


class open_quiet:
    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> str:
        try:
            return Path(self.path).read_text()
        except OSError:
            return ""

    def __exit__(self, *exc: object) -> None:
        return None


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> bool:
        return exc_type is not None and issubclass(exc_type, OSError)


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


# -------------------------------------------------------------------------------- tables


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "n/a"
            return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Goals:
    """Goal lines for a section, remembered for the summary at the top of RESULTS.md."""

    def __init__(self) -> None:
        self.rows: list[dict[str, str]] = []

    def check(
        self, name: str, value: float, goal: float, unit: str, *, lower_is_better: bool
    ) -> str:
        """'met' or 'missed by X' for one goal, as a markdown bullet."""
        bound = "≤" if lower_is_better else "≥"
        if math.isnan(value):
            status = "no measurement"
            line = f"- {name}: no measurement (goal {bound} {goal:g} {unit})"
        else:
            met = value <= goal if lower_is_better else value >= goal
            gap = value - goal if lower_is_better else goal - value
            ratio = value / goal if lower_is_better else goal / value if value else math.inf
            status = "met" if met else f"missed by {gap:,.2f} {unit} ({ratio:.1f}x off)"
            line = (
                f"- {name}: **met** ({value:,.2f} {unit}, goal {bound} {goal:g} {unit})"
                if met
                else f"- {name}: **missed** by {gap:,.2f} {unit}: {value:,.2f} {unit} against "
                f"a goal of {bound} {goal:g} {unit} ({ratio:.1f}x off)"
            )
        self.rows.append(
            {
                "metric": name,
                "value": "n/a" if math.isnan(value) else f"{value:,.2f} {unit}",
                "goal": f"{bound} {goal:g} {unit}",
                "status": status,
            }
        )
        return line

    def count(self, name: str, value: int) -> str:
        """A goal of zero (errors)."""
        status = "met" if value == 0 else f"missed ({value})"
        self.rows.append({"metric": name, "value": str(value), "goal": "0", "status": status})
        return f"- {name}: {value} ({'**met**' if value == 0 else '**missed**'}, goal 0)"

    def info(self, name: str, value: str) -> None:
        """A reported number without a goal."""
        self.rows.append({"metric": name, "value": value, "goal": "-", "status": "reported"})


def cpu_table(used: dict[str, float], wall: float, requests: int) -> str:
    """CPU per process over a window: cores busy and CPU microseconds per request."""
    rows = []
    total = sum(used.values())
    for name, secs in sorted(used.items(), key=lambda kv: -kv[1]):
        per = secs / requests * 1e6 if requests else math.nan
        rows.append([name, f"{secs / wall:.2f}", f"{per:,.0f}"])
    rows.append(
        ["**all**", f"{total / wall:.2f}", f"{total / requests * 1e6:,.0f}" if requests else "n/a"]
    )
    return table(["process", "cores busy", "CPU µs per request"], rows)


# ------------------------------------------------------------------------------ profiles


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


class Profiler:
    """``py-spy record`` on some processes for a fixed time; summaries of where CPU went."""

    def __init__(self, name: str, procs: dict[str, Proc], seconds: float, rate: int = 200) -> None:
        self.name = name
        self.procs = procs
        self.seconds = seconds
        self.rate = rate
        self.spies: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.error = ""

    def start(self) -> bool:
        exe = py_spy()
        if exe is None:
            self.error = "py-spy is not installed (pip install py-spy)"
            return False
        out = OUT_DIR / "profiles"
        out.mkdir(parents=True, exist_ok=True)
        for label, proc in self.procs.items():
            path = out / f"{self.name}-{label}.txt"
            spy = subprocess.Popen(
                [
                    exe,
                    "record",
                    "--pid",
                    str(proc.pid),
                    "--rate",
                    str(self.rate),
                    "--duration",
                    str(int(self.seconds)),
                    "--format",
                    "raw",
                    "--output",
                    str(path),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            self.spies[label] = (spy, path)
        time.sleep(0.5)  # py-spy attaches
        return True

    def finish(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for label, (spy, path) in self.spies.items():
            try:
                _, err = spy.communicate(timeout=self.seconds + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
            if not path.exists():
                out[label] = {"error": err.decode(errors="replace")[-500:]}
                continue
            out[label] = summarize_collapsed(path.read_text())
            out[label]["file"] = str(path.relative_to(OUT_DIR.parent))
        return out


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "func (path/to/module.py:123)"; keep func + short file.
    func, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file, _, _line = where.rpartition(":")
    parts = Path(file).parts
    if "site-packages" in parts:
        short = "/".join(parts[parts.index("site-packages") + 1 :])
    else:
        short = "/".join(parts[-2:])
    return f"{func} ({short})"


def _area(frame: str) -> str:
    """A coarse owner of a frame, to say which layer the CPU goes to."""
    if frame.startswith("Runner.run (") and "asyncio/runners.py" in frame:
        return "event loop internals (uvloop C code: sockets, callbacks)"
    table_ = [
        ("gateway/", "corral gateway code"),
        ("worker/", "corral worker code"),
        ("corral/", "corral shared code"),
        ("redis/", "redis-py client"),
        ("uvicorn/", "uvicorn (HTTP server)"),
        ("starlette/", "starlette (routing, requests)"),
        ("aiohttp/", "aiohttp (HTTP client)"),
        ("httpx/", "httpx (HTTP client)"),
        ("httpcore/", "httpcore (HTTP client)"),
        ("anyio/", "anyio"),
        ("h11/", "h11"),
        ("asyncio/", "asyncio"),
        ("json", "json"),
        ("logging/", "logging"),
    ]
    for needle, label in table_:
        if needle in frame:
            return label
    return "other (event loop, C code, stdlib)"


def summarize_collapsed(text: str, top: int = 15) -> dict[str, Any]:
    """Self time and inclusive time per function from py-spy's collapsed stacks."""
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [f for f in stack.split(";") if f]
        # The first frame is "process ..."/"thread ..." in py-spy raw output: skip labels.
        frames = [f for f in frames if "(" in f]
        if not frames:
            continue
        total += count
        leaf = _frame_name(frames[-1])
        if leaf.startswith("Runner.run (") and "asyncio/runners.py" in leaf:
            leaf = "(event loop internals: uvloop C code)"
        self_time[leaf] += count
        areas[_area(_owner(frames))] += count
        for name in {_frame_name(f) for f in frames}:
            inclusive[name] += count
    return {
        "samples": total,
        "self": [(n, c / total * 100) for n, c in self_time.most_common(top)] if total else [],
        # Start-up frames (main, runpy, Runner.run, uvicorn's run) hold every sample.
        "inclusive": [
            (n, c / total * 100) for n, c in inclusive.most_common() if not _scaffolding(n)
        ][: top + 10]
        if total
        else [],
        "areas": [(n, c / total * 100) for n, c in areas.most_common()] if total else [],
    }


_SCAFFOLD = (
    "_run_module_as_main ",
    "_run_code ",
    "<module> ",
    "main (",
    "run (",
    "Runner.run ",
    "asyncio_run ",
    "Server.run ",
    "Server.serve ",
    "Server._serve ",
    "wrapper (",
)


def _scaffolding(name: str) -> bool:
    return name.startswith(_SCAFFOLD)


def _owner(frames: list[str]) -> str:
    """The innermost frame that belongs to a library we can name (else the leaf)."""
    for frame in reversed(frames):
        if _area(frame) != "other (event loop, C code, stdlib)":
            return frame
    return frames[-1]


def profile_markdown(
    label: str, summary: dict[str, Any], *, top: int = 12, cpu_us: float | None = None
) -> str:
    """A profile as tables; ``cpu_us`` (the process's CPU per request) adds µs columns."""
    if "error" in summary:
        return f"_{label}: profile failed: {summary['error']}_"
    parts = [f"**{label}** ({summary['samples']} samples, file `{summary.get('file', '')}`)"]
    parts.append("")
    parts.append(
        "CPU by layer (each sample goes to the innermost frame that belongs to a named "
        "library or to Corral)"
        + (f", scaled to this process's {cpu_us:,.0f} µs of CPU per request:" if cpu_us else ":")
    )
    parts.append("")
    if cpu_us:
        parts.append(
            table(
                ["layer", "% of samples", "≈ µs per request"],
                [[n, f"{p:.1f}", f"{p / 100 * cpu_us:,.0f}"] for n, p in summary["areas"]],
            )
        )
    else:
        parts.append(
            table(["layer", "% of samples"], [[n, f"{p:.1f}"] for n, p in summary["areas"]])
        )
    parts.append("")
    parts.append("Top functions by self time:")
    parts.append("")
    parts.append(
        table(["function", "self %"], [[f"`{n}`", f"{p:.1f}"] for n, p in summary["self"][:top]])
    )
    parts.append("")
    parts.append("Top functions by inclusive time (the function and what it calls):")
    parts.append("")
    parts.append(
        table(
            ["function", "inclusive %"],
            [[f"`{n}`", f"{p:.1f}"] for n, p in summary["inclusive"][:top]],
        )
    )
    return "\n".join(parts)


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()
