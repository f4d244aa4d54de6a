"""How Corral's RQ jobs are stored: as JSON, never pickle.

RQ pickles a job's function, arguments and meta by default, so whoever can write an
``rq:job:*`` hash could make the RQ worker run any code it unpickles. Corral's retry jobs
carry only strings and numbers, and every reader and writer of them (the scheduler's
queue and RQ worker, the dead-letter commands, snapshots) passes this serializer.
"""

from __future__ import annotations

from rq.serializers import JSONSerializer

SERIALIZER = JSONSerializer

__all__ = ["SERIALIZER"]
