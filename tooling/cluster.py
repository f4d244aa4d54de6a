"""A whole Corral fleet inside one event loop: fake Ollama nodes, workers and a gateway.

Tests and benchmarks use it to exercise the real code over real sockets and a real
Redis without spawning processes. (Crash tests, which need SIGKILL, start processes.)
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import uvicorn

from corral import connections
from corral.netutil import listen_socket
from corral.settings import GatewaySettings, SchedulerSettings, WorkerSettings
from corral.tooling.fake_ollama import FakeOllamaConfig, FakeOllamaServer, start_fake_ollama


@dataclass
class LocalNode:
    node_id: str
    fake: FakeOllamaServer
    worker: Any  # worker.daemon.Worker; typed loosely so corral/ never imports worker/
    task: asyncio.Task[None]

    async def stop(self, *, graceful: bool = True) -> None:
        """Stop the worker (drain, hand back) and then its fake Ollama."""
        if graceful:
            self.worker.request_stop()
        else:
            self.task.cancel()
        await asyncio.wait([self.task])
        from corral.worker.main import close

        await close(self.worker)
        await self.fake.stop()


class LocalGateway:
    def __init__(self, settings: GatewaySettings) -> None:
        from corral.gateway.app import create_app
        from corral.gateway.connection_guard import GuardedConfig
        from corral.gateway.main import connection_limits

        self.settings = settings
        self.app = create_app(settings)
        self.sock = listen_socket("127.0.0.1", 0)
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = GuardedConfig(
            self.app,
            limits=connection_limits(settings),
            log_level="warning",
            access_log=False,
            lifespan="on",
            backlog=4096,
        )
        self.server = uvicorn.Server(config)
        self.app.on_failure = lambda: setattr(self.server, "should_exit", True)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                await self.task  # surfaces the start-up error
            await asyncio.sleep(0.01)  # uvicorn offers no start event to wait on

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await asyncio.wait([self.task])
        self.sock.close()

    @property
    def state(self) -> Any:
        return self.app.state.corral


class LocalScheduler:
    """The scheduler loop in this event loop, plus its RQ worker as a real child process."""

    def __init__(self, redis_url: str, /, **overrides: Any) -> None:
        from redis import Redis as SyncRedis

        from corral.scheduler.daemon import Scheduler

        options = {"interval": 0.1, "retry_base": 0.2, "retry_cap": 1.0, **overrides}
        self.settings = SchedulerSettings(**{"redis_url": redis_url, **options})
        self.redis = connections.pooled(self.settings.redis_url, 8)
        self.rq_redis = SyncRedis.from_url(self.settings.redis_url)
        self.scheduler = Scheduler(self.settings, self.redis, self.rq_redis)
        self.task = asyncio.create_task(self.scheduler.run(), name="scheduler")
        self.child: Any = None
        if self.settings.rq_worker:
            from corral.scheduler.main import start_rq_worker

            self.child = start_rq_worker(self.settings)

    async def stop(self) -> None:
        from corral.scheduler.main import RQ_WORKER_GRACE

        self.scheduler.request_stop()
        await asyncio.wait([self.task])
        if self.child is not None:
            await self.child.stop_async(RQ_WORKER_GRACE)
        self.rq_redis.close()
        await self.redis.aclose()


class LocalCluster:
    """Start with ``await LocalCluster.start(redis_url, ...)``; stop with ``await c.stop()``.

    Every process uses ``redis_url`` unless its options name their own ``redis_url``
    (as the ACL tests do, to run each role as its own Redis user).
    """

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.nodes: list[LocalNode] = []
        self.gateway: LocalGateway | None = None
        self.scheduler: LocalScheduler | None = None

    @classmethod
    async def start(
        cls,
        redis_url: str,
        nodes: list[FakeOllamaConfig] | None = None,
        *,
        slots: int | None = None,
        gateway: dict[str, Any] | None = None,
        worker: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> LocalCluster:
        """``scheduler=None`` runs none; ``{}`` runs one with test-friendly defaults."""
        cluster = cls(redis_url)
        try:
            for config in nodes if nodes is not None else [FakeOllamaConfig()]:
                await cluster.add_node(config, slots=slots, **(worker or {}))
            await cluster.start_gateway(**(gateway or {}))
            if scheduler is not None:
                cluster.scheduler = LocalScheduler(redis_url, **scheduler)
        except BaseException:
            await cluster.stop()
            raise
        return cluster

    @property
    def url(self) -> str:
        assert self.gateway is not None
        return self.gateway.url

    async def start_gateway(self, **overrides: Any) -> LocalGateway:
        settings = GatewaySettings(**{"redis_url": self.redis_url, "port": 0, **overrides})
        self.gateway = LocalGateway(settings)
        await self.gateway.start()
        return self.gateway

    async def add_node(
        self, config: FakeOllamaConfig, *, slots: int | None = None, **overrides: Any
    ) -> LocalNode:
        from corral.worker.main import build

        fake = await start_fake_ollama(config)
        node_id = overrides.pop("node_id", f"node{len(self.nodes) + 1}")
        settings = WorkerSettings(
            ollama_url=fake.url,
            node_id=node_id,
            num_parallel=slots or config.num_parallel,
            **{
                "redis_url": self.redis_url,
                "heartbeat_interval": 0.5,
                "drain_timeout": 5.0,
                **overrides,
            },
        )
        instance = build(settings)
        task = asyncio.create_task(instance.run(), name=f"worker-{node_id}")
        ready = asyncio.create_task(instance.ready.wait())
        await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            ready.cancel()
            await task  # surfaces the start-up error
        node = LocalNode(node_id, fake, instance, task)
        self.nodes.append(node)
        return node

    async def stop(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.stop()
            self.scheduler = None
        if self.gateway is not None:
            await self.gateway.stop()
            self.gateway = None
        for node in self.nodes:
            with contextlib.suppress(Exception):
                await node.stop()
        self.nodes.clear()
