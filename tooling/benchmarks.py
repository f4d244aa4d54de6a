"""``corral bench``: run the benchmarks in ``bench/`` (``bench/run_all.py``), or, with
``--gateway URL``, load a running gateway (``corral.tooling.loadgen``).

The benchmarks live in the source tree, not in the installed package: this looks for
``bench/run_all.py`` under the current directory, then next to the ``corral`` package
(an editable install or a checkout), and runs it with this interpreter. Arguments are
passed through (``corral bench --smoke``, ``corral bench --only overhead``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RUN_ALL = Path("bench") / "run_all.py"


def find_run_all(cwd: Path | None = None) -> Path | None:
    """``bench/run_all.py`` under ``cwd`` (default: the current directory) or the repo."""
    candidates = [
        (cwd or Path.cwd()) / RUN_ALL,
        Path(__file__).resolve().parent.parent / RUN_ALL,
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a == "--gateway" or a.startswith("--gateway=") for a in args):
        from corral.tooling import loadgen

        return loadgen.main(args)
    script = find_run_all()
    if script is None:
        print(
            "corral bench: bench/run_all.py not found; run it from a Corral checkout "
            "(the benchmarks are not part of the installed package)",
            file=sys.stderr,
        )
        return 2
    repo = script.parent.parent
    return subprocess.call([sys.executable, str(script), *args], cwd=repo)


if __name__ == "__main__":
    raise SystemExit(main())
