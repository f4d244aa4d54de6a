"""Signal handling for long-running processes: the first SIGTERM/SIGINT asks for a graceful
stop, a second one escalates to cancelling the main task. Installed and removed in one
place, and the handlers only set state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def graceful_signals(request_stop: Callable[[], None]) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    seen = 0

    def handle(sig: signal.Signals) -> None:
        nonlocal seen
        seen += 1
        if seen == 1:
            log.info("received %s, stopping gracefully (again to force)", sig.name)
            request_stop()
        elif main is not None:
            log.warning("received %s again, forcing stop", sig.name)
            main.cancel()

    for sig in _SIGNALS:
        loop.add_signal_handler(sig, handle, sig)
    try:
        yield
    finally:
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)


def run(main: Callable[[], object]) -> None:
    """``asyncio.run`` with uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())  # type: ignore[arg-type]
    else:
        uvloop.run(main())  # type: ignore[arg-type]
