"""Single-flight: identical cacheable requests in flight at once share one job.

Every request of one key on this gateway joins one ``Flight``, which finds the answer
once for all of them: from L2, or by leading (running the job) or following (another
gateway runs it). Its subscribers each get every reply in an ``Inbox``, as if the job
were theirs, and the relay writes them exactly as for a job of their own.

Across gateways the lock ``keys.cache_flight(key)`` (``SET NX`` with a short TTL that the
leading gateway renews while its job runs) names the job that answers the key. A
gateway that finds it taken follows that job: it reads the job's replay list and record
(one ``MULTI`` per poll, at most CORRAL_CACHE_FOLLOW_POLL apart) and hands the replies on.
The leading gateway writes the answer into the cache once the job is done.

Faults:

* the leader's client leaves: the job is cancelled only when no request on this gateway
  still follows it and no other gateway does (followers refresh ``cache_followed``);
  otherwise it runs on, and is cached;
* the job fails: every follower gets the same error (it is the answer); a job cancelled
  or expired from under its followers is run again by a follower, which takes the lock;
  chunks the followers already wrote are not written twice (the relay drops repeated
  sequence numbers);
* the leading gateway dies: its lock lapses (no renewals); a job it had enqueued is
  still followed to its end (workers and job records do not need that gateway), one it
  had not is run by a follower;
* a lookup or lock that Redis does not answer in time: the flight runs its own job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from corral import keys, protocol
from corral.gateway.cache_store import Answer
from corral.gateway.replies import Inbox
from corral.jobs import JobSpec, new_job_id
from corral.protocol import Reply

if TYPE_CHECKING:
    from corral.gateway.cache import ResponseCache

log = logging.getLogger(__name__)

_ENDED = (b"done", b"failed", b"dead")
"""Job states whose outcome is the followers' answer too."""
_GAVE_UP = (b"cancelled", b"expired")
"""Job states that leave followers without an answer: they run the job again."""


class Flight:
    """One key's answer being found on this gateway; create it with ``ResponseCache``."""

    def __init__(self, cache: ResponseCache, key: str, spec: JobSpec, level: int) -> None:
        self.cache = cache
        self.key = key
        self.spec = spec
        self.level = level
        self.job_id = ""
        """The job whose replies this flight relays (its own, or the one it follows)."""
        self.leading = False
        """Whether this gateway runs the job (and holds the lock)."""
        self.locked = False
        self.first: Inbox | None = None
        """The request that started the flight: the only one told ``miss`` if it leads."""
        self.subscribers: list[Inbox] = []
        self.history: list[Reply] = []
        self.chunks: dict[int, bytes] = {}
        self.final: Reply | None = None
        self.complete = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done once the flight knows where its answer comes from; its exception (queue
        full, Redis down) is what each waiting request answers with."""
        self.task: asyncio.Task[None] | None = None

    # -- subscribers -------------------------------------------------------------------

    def join(self) -> Inbox:
        inbox = Inbox()
        for reply in self.history:
            inbox.put_nowait(reply)
        if self.first is None:
            self.first = inbox
        self.subscribers.append(inbox)
        return inbox

    async def leave(self, inbox: Inbox) -> None:
        """A request is done with the flight (answered, timed out, or its client left)."""
        with contextlib.suppress(ValueError):
            self.subscribers.remove(inbox)
        if self.subscribers or self.complete:
            return
        if self.cache.flights.get(self.key) is self:
            del self.cache.flights[self.key]  # a request arriving now starts afresh
        if not self.leading:
            if self.task is not None:
                self.task.cancel()
            return
        try:
            followed = await self.cache.redis.exists(keys.cache_followed(self.key))
        except (RedisError, OSError):
            followed = 1  # unknown: let the job run, and be cached
        if followed or self.subscribers or self.complete:
            log.info("job %s keeps running for requests that follow it", self.job_id)
            return
        try:
            await self.cache.store_jobs.cancel(self.job_id, "client disconnected")
        except (RedisError, OSError) as exc:
            log.warning("cancelling job %s failed: %s", self.job_id, exc)

    def _deliver(self, reply: Reply) -> None:
        self.history.append(reply)
        for inbox in self.subscribers:
            inbox.put_nowait(reply)
        if reply.final:
            if self.final is None or self.final.seq == protocol.UNSEQUENCED:
                self.final = reply
        elif reply.seq not in self.chunks:
            self.chunks[reply.seq] = reply.payload
        self._check_complete()

    def _check_complete(self) -> None:
        final = self.final
        if final is None:
            return
        if final.seq == protocol.UNSEQUENCED or all(i in self.chunks for i in range(final.seq)):
            self.complete = True
            # From now on a new request of this key is answered from L1 (a done answer)
            # or runs afresh (an error is never anyone else's answer).
            answer = self.answer()
            if answer is not None and answer.size <= self.cache.settings.cache_entry_max_bytes:
                self.cache.store.remember(self.key, answer)
            if self.cache.flights.get(self.key) is self:
                del self.cache.flights[self.key]

    def answer(self) -> Answer | None:
        """The answer to cache, once complete and done; None for errors and partial ones."""
        final = self.final
        if not self.complete or final is None or final.type != protocol.DONE:
            return None
        if final.seq == protocol.UNSEQUENCED:
            if self.spec.stream:
                return None  # rebuilt from the record: the chunk count is unknown
            return Answer((), final.payload)
        return Answer(tuple(self.chunks[i] for i in range(final.seq)), final.payload)

    # -- the flight's task -------------------------------------------------------------

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"flight-{self.key[:8]}")
        self.cache.tasks.add(self.task)
        self.task.add_done_callback(self.cache.tasks.discard)

    async def _run(self) -> None:
        try:
            found = await self.cache.store.fetch(self.key)
            if found is not None:
                self._serve(found)
                return
            await self._find(self.spec)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self.ready.done():
                self.ready.set_exception(exc)
                self.ready.exception()  # retrieved: each waiting request re-raises it
            elif not self.complete:
                log.error("flight %s failed", self.key, exc_info=exc)
                self._deliver(
                    Reply(self.job_id, protocol.UNSEQUENCED, protocol.ERROR,
                          protocol.error_payload(f"internal error: {exc!r}", 500))
                )  # fmt: skip
        finally:
            await asyncio.shield(self._end())

    async def _end(self) -> None:
        if self.leading and self.locked:
            self.cache.leading.pop(self.key, None)
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self.cache.settings.cache_lookup_timeout * 4):
                    await self.cache.redis.delete(keys.cache_flight(self.key))
        if self.cache.flights.get(self.key) is self:
            del self.cache.flights[self.key]

    def _serve(self, found: Answer) -> None:
        """Answer every subscriber from a stored answer."""
        self._ready()
        for seq, chunk in enumerate(found.chunks):
            self._deliver(Reply("", seq, protocol.CHUNK, chunk))
        self._deliver(Reply("", len(found.chunks), protocol.DONE, found.final))

    def _ready(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    async def _find(self, spec: JobSpec) -> None:
        """Lead with ``spec`` if the lock is free, else follow the job that holds it."""
        while True:
            holder, found = await self._claim(spec.job_id)
            if found is not None:
                self._serve(found)
                return
            if holder is None:
                await self._lead(spec)
                return
            if await self._follow(holder):
                return
            spec = dataclasses.replace(spec, job_id=new_job_id())  # the leader gave up

    async def _claim(self, job_id: str) -> tuple[str | None, Answer | None]:
        """Take the lock for ``job_id`` and look for the answer again, in one step.

        Returns (None, None) when this gateway now holds the lock (or Redis could not
        say: then it runs its own job unlocked), (holder's job id, None) when another
        job holds it, and (_, answer) when the answer was stored meanwhile: a leader
        stores its answer before it drops the lock, so one transaction cannot miss both."""
        cache = self.cache
        lock = keys.cache_flight(self.key)
        value = f"{cache.gateway_id} {job_id}"
        ttl_ms = int(cache.settings.cache_flight_ttl * 1000)
        try:
            async with asyncio.timeout(cache.settings.cache_lookup_timeout * 4):
                async with cache.redis.pipeline(transaction=True) as pipe:
                    pipe.set(lock, value, nx=True, px=ttl_ms, get=True)
                    pipe.get(keys.cache_entry(self.key))
                    old, stored = await pipe.execute()
        except (TimeoutError, RedisError, OSError) as exc:
            log.warning("single-flight lock unavailable, running alone: %r", exc)
            return None, None
        found = cache.store.decoded(self.key, stored) if stored is not None else None
        if found is not None:
            if old is None:  # taken for nothing: let the next one have it
                with contextlib.suppress(TimeoutError, RedisError, OSError):
                    async with asyncio.timeout(cache.settings.cache_lookup_timeout * 4):
                        await cache.redis.delete(lock)
            return None, found
        if old is None:
            self.locked = True
            return None, None
        parts = old.split(b" ") if isinstance(old, bytes) else []
        if len(parts) != 2:
            return None, None  # not a lock we wrote: run alone rather than follow nothing
        return bytes(parts[1]).decode(), None

    async def _lead(self, spec: JobSpec) -> None:
        cache = self.cache
        self.leading = True
        self.job_id = spec.job_id
        inbox = cache.router.register(spec.job_id)
        try:
            try:
                await cache.store_jobs.enqueue(spec, max_queue=cache.settings.max_queue)
            except Exception as exc:
                if self.ready.done():  # a follower taking over: its requests get the error
                    self._deliver_error(str(exc), getattr(exc, "status", 503))
                    return
                raise
            if self.locked:
                cache.leading[self.key] = self
            self._ready()
            await self._consume(inbox)
        finally:
            cache.router.unregister(spec.job_id)
        answer = self.answer()
        if answer is not None:
            await cache.store.store(self.key, answer, level=self.level)

    async def _consume(self, inbox: Inbox) -> None:
        timeout = self.cache.settings.request_timeout
        while not self.complete:
            try:
                async with asyncio.timeout(timeout):
                    reply = await inbox.get()
            except TimeoutError:
                with contextlib.suppress(RedisError, OSError):
                    await self.cache.store_jobs.cancel(
                        self.job_id, f"no output for {timeout:g}s", expired=True
                    )
                self._deliver_error(f"no output for {timeout:g}s", 504)
                return
            self._deliver(reply)

    def _deliver_error(self, message: str, status: int) -> None:
        payload = protocol.error_payload(message, status)
        self._deliver(Reply(self.job_id, protocol.UNSEQUENCED, protocol.ERROR, payload))

    async def _follow(self, job_id: str) -> bool:
        """Relay the replies of another gateway's job ``job_id``. True once answered;
        False when that job will not answer (cancelled, expired, its lock lapsed) and
        this flight should run the request itself."""
        cache = self.cache
        self.job_id = job_id
        self._ready()
        poll = cache.settings.cache_follow_poll
        followed_ms = int(max(1.0, 8 * poll) * 1000)
        delay, offset = min(0.002, poll), 0
        out, record, lock = keys.output(job_id), keys.job(job_id), keys.cache_flight(self.key)
        while True:
            try:
                async with cache.redis.pipeline(transaction=True) as pipe:
                    pipe.lrange(out, offset, -1)
                    pipe.hmget(record, "state", "result", "error", "status", "replay_cut")
                    pipe.get(lock)
                    pipe.set(keys.cache_followed(self.key), cache.gateway_id, px=followed_ms)
                    messages, fields, holder, _ = await pipe.execute()
                    state, result, error, status, cut = fields
            except (RedisError, OSError) as exc:
                # Redis away for a moment: read again later (each request waiting here
                # still ends at its own time limit).
                log.warning("following job %s: %r", job_id, exc)
                await asyncio.sleep(poll)  # backoff
                continue
            for message in messages:
                offset += 1
                self._deliver(protocol.decode(message))
            if self.complete:
                return True
            if state in _ENDED:
                if cut and offset > 0:
                    # The worker kept only the first chunks of this long answer: the
                    # record's whole answer would repeat what was sent. Its leader has
                    # cached it by now, so the request asked again is answered whole.
                    self._deliver_error(
                        "the answer was too long to relay from another gateway; please try again",
                        503,
                    )
                elif state == b"done" and result is not None:
                    self._deliver(Reply(job_id, protocol.UNSEQUENCED, protocol.DONE, result))
                else:
                    text = (error or b"job failed").decode()
                    self._deliver_error(text, int(status or 500))
                return True
            if state in _GAVE_UP:
                log.info("job %s that requests followed ended %s: running it again", job_id, state)
                return False
            if holder is not None and holder.split(b" ")[-1] != job_id.encode():
                job_id = holder.split(b" ")[-1].decode()  # another job answers the key now
                self.job_id, offset = job_id, 0
                out, record = keys.output(job_id), keys.job(job_id)
                continue
            if holder is None and state is None:
                # The lock lapsed and no such job exists: its gateway died before it
                # enqueued the job (or the record expired). A job that does exist is
                # followed to its end even without its gateway: a worker runs it and its
                # record gets the answer (a queued one of a gateway gone for
                # CORRAL_GATEWAY_TTL is cancelled as an orphan, and then run again here).
                log.info("lock on job %s lapsed and it does not exist: running it", job_id)
                return False
            await asyncio.sleep(delay)  # polling another gateway's job: nothing to wait on
            delay = min(delay * 2, poll)


async def renew_locks(cache: ResponseCache) -> None:
    """Extend the locks of the jobs this gateway leads (one round trip for all)."""
    names = list(cache.leading)
    if not names:
        return
    ttl_ms = int(cache.settings.cache_flight_ttl * 1000)
    async with cache.redis.pipeline(transaction=False) as pipe:
        for key in names:
            pipe.pexpire(keys.cache_flight(key), ttl_ms)
        await pipe.execute()
