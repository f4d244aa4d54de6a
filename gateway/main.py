"""``corral gateway``: serve the Ollama/OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from corral import logs
from corral.cli import run_command
from corral.gateway.app import create_app
from corral.gateway.connection_guard import ConnectionLimits, GuardedConfig
from corral.netutil import listen_socket
from corral.settings import GatewaySettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral gateway", description=__doc__)
    GatewaySettings.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    settings = GatewaySettings.from_args(build_parser().parse_args(argv))
    logs.configure(settings.log_level, "gateway")
    # Our own socket, so accepted connections get TCP_NODELAY (see corral.netutil).
    sock = listen_socket(settings.host, settings.port)
    options: dict[str, Any] = {
        "log_level": "warning",
        "access_log": False,
        # Corral reads no client address; X-Forwarded-For parsing would only cost CPU.
        "proxy_headers": False,
        "timeout_graceful_shutdown": 30,
        "backlog": 4096,
    }
    limits = connection_limits(settings)
    if settings.workers == 1:
        app = create_app(settings)
        server = uvicorn.Server(GuardedConfig(app, limits=limits, **options))
        app.on_failure = lambda: setattr(server, "should_exit", True)
        server.run(sockets=[sock])
        return 1 if app.failure else 0
    # Worker processes rebuild the settings from the environment: hand flags down as env.
    for name, value in settings.model_dump().items():
        if name != "gateway_id":
            os.environ[f"CORRAL_{name.upper()}"] = str(value)
    config = GuardedConfig(
        "corral.gateway.main:app_from_env",
        limits=limits,
        factory=True,
        workers=settings.workers,
        **options,
    )
    Multiprocess(config, sockets=[sock]).run()
    return 0


def connection_limits(settings: GatewaySettings) -> ConnectionLimits:
    return ConnectionLimits(
        header_timeout=settings.header_timeout,
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        max_connections=settings.max_connections,
    )


def app_from_env() -> object:
    settings = GatewaySettings()
    logs.configure(settings.log_level, "gateway")
    return create_app(settings)


if __name__ == "__main__":
    raise SystemExit(run_command("gateway", sys.argv[1:]))
