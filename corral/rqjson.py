"""How Corral's RQ jobs are stored and what the RQ worker agrees to run.

RQ pickles a job's function, arguments and meta by default, so whoever can write an
``rq:job:*`` hash could make the RQ worker run any code it unpickles. Corral's retry jobs
carry only strings and numbers, and every reader and writer of them (the scheduler's
queue and RQ worker, the dead-letter commands) passes the JSON serializer. JSON alone
still names the function to call (``os.system`` is importable too), so the RQ worker
uses :class:`CorralJob`, which runs only Corral's retry function and no callbacks.
"""

from __future__ import annotations

from typing import Any

from rq.job import Job
from rq.serializers import JSONSerializer

SERIALIZER = JSONSerializer

RETRY_FUNCTIONS = frozenset({"corral.scheduler.retry_job.revive"})
"""The only functions a retry job may name."""


class UnsafeJob(Exception):
    """An RQ job in Corral's queue names a function or callback Corral never enqueues."""


class CorralJob(Job):
    """An RQ job that may only run Corral's retry function, without callbacks."""

    @property
    def func(self) -> Any:
        if self.instance is not None or self.func_name not in RETRY_FUNCTIONS:
            raise UnsafeJob(f"refusing to run {self.func_name!r}: not a Corral retry job")
        for name in (
            self._success_callback_name,
            self._failure_callback_name,
            self._stopped_callback_name,
        ):
            if name:
                raise UnsafeJob(f"refusing a job with the callback {name!r}")
        return super().func


__all__ = ["RETRY_FUNCTIONS", "SERIALIZER", "CorralJob", "UnsafeJob"]
