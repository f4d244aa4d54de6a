"""``corral redis-setup``: load Corral's Functions library into Redis (an admin step).

The shipped ACL lets Corral's roles call its functions (``FCALL``) but not load any
(``FUNCTION LOAD``) nor run arbitrary Lua (``EVAL``), so an operator loads the library
once per Corral version, as the Redis admin user, before starting the new version's
processes. Redis keeps functions in its RDB/AOF files, so a restart keeps them (a Redis
without persistence needs this step again after a restart). Without ACL users (a
loopback-only Redis, tests, ``make demo``) the processes load it themselves on first use.

The Redis URL, with the admin's password, comes from ``CORRAL_REDIS_URL`` only, never
from the command line (where ``ps`` would show it).
"""

from __future__ import annotations

import argparse

from redis import Redis

from corral import scripts
from corral.settings import CommonSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral redis-setup", description=__doc__)
    parser.add_argument(
        "--prune",
        action="store_true",
        help="also delete the libraries of other Corral versions (once none runs)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    connection = Redis.from_url(CommonSettings.build().redis_url)
    try:
        scripts.load_sync(connection)
        name = f"corral_{scripts.version()}"
        print(f"loaded Redis function library {name} ({len(scripts.NAMES)} functions)")
        if args.prune:
            for library in connection.function_list(library="corral_*"):
                fields = dict(zip(library[::2], library[1::2], strict=True))
                other = fields[b"library_name"].decode()
                if other != name:
                    connection.function_delete(other)
                    print(f"deleted {other}")
        return 0
    finally:
        connection.close()
