"""``corral``: one command, a subcommand per process or tool.

Subcommands are imported only when run, so ``corral worker`` never loads the gateway
and the shared core never imports a process package at import time.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from corral import __version__
from corral.errors import ConfigError

COMMANDS: dict[str, tuple[str, str]] = {
    "gateway": ("corral.gateway.main", "serve the Ollama/OpenAI-compatible HTTP endpoint"),
    "worker": ("corral.worker.main", "run the daemon for one Ollama node"),
    "scheduler": ("corral.scheduler.main", "run maintenance: reclaim, retries, dead letters"),
    "status": ("corral.status", "show queues, nodes and counters"),
    "submit": ("corral.tooling.send", "send one request through the gateway"),
    "dlq": ("corral.scheduler.dlq", "list, retry or purge dead-lettered jobs"),
    "keys": ("corral.apikeys", "add, list, change or revoke API keys and their classes"),
    "redis-setup": ("corral.redis_setup", "load Corral's functions into Redis (as its admin)"),
    "fake-ollama": ("corral.tooling.fake_ollama", "run a simulated Ollama node"),
    "demo": ("corral.tooling.demo", "start a local fleet and send it real requests"),
    "bench": (
        "corral.tooling.benchmarks",
        "load a running gateway (--gateway URL), or run the benchmarks in bench/",
    ),
}


def usage() -> str:
    lines = [f"corral {__version__}: an Ollama fleet behind one endpoint", "", "commands:"]
    lines += [f"  {name:<12} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "run `corral COMMAND --help` for a command's options"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = command_first(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] in ("-V", "--version"):
        print(__version__)
        return 0
    if args[0] not in COMMANDS:
        print(f"corral: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run_command(args[0], args[1:])


def command_first(args: list[str]) -> list[str]:
    """``corral --redis-url URL status`` as ``corral status --redis-url URL``: flags may
    stand on either side of the command's name."""
    if not args or not args[0].startswith("-") or args[0] in ("-h", "--help", "-V", "--version"):
        return args
    for index, word in enumerate(args):
        if word in COMMANDS:
            return [word, *args[:index], *args[index + 1 :]]
    return args


NEEDS: dict[str, tuple[str, str]] = {
    "demo": ("ollama", "demo"),
}
"""Commands that need an optional dependency: (the module, the extra that installs it)."""


def run_command(name: str, argv: list[str]) -> int:
    """Run one subcommand; bad settings are reported one line each, exit status 2."""
    if name in NEEDS:
        needed, extra = NEEDS[name]
        if importlib.util.find_spec(needed) is None:
            print(
                f"corral {name}: needs the {needed!r} package, which a plain install lacks: "
                f"pip install 'corral[{extra}]' (make demo installs it)",
                file=sys.stderr,
            )
            return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        result: int = module.main(argv)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"corral {name}: {problem}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    raise SystemExit(main())
