"""A TCP proxy that misbehaves on demand, for tests of network faults.

``freeze()`` stops forwarding on every connection open now, in both directions, without
closing anything: what a connection looks like when a NAT or firewall forgot it, or the
far host vanished. Connections opened later are forwarded as usual. ``hold_new()`` makes
new connections wait, accepted but silent, until ``release()``: a blip during which a
client cannot get back to the server.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit


class _Link:
    """One proxied connection: a pump each way, gated by ``flowing``."""

    def __init__(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        *,
        flowing: bool,
    ) -> None:
        self.flowing = asyncio.Event()
        if flowing:
            self.flowing.set()
        self.writers = (client[1], upstream[1])
        self.pumps = [
            asyncio.create_task(self._pump(client[0], upstream[1])),
            asyncio.create_task(self._pump(upstream[0], client[1])),
        ]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                await self.flowing.wait()  # frozen: hold the bytes, and the end, for ever
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()  # pass the end on to the other side

    async def close(self) -> None:
        for pump in self.pumps:
            pump.cancel()
        await asyncio.gather(*self.pumps, return_exceptions=True)
        for writer in self.writers:
            writer.close()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target``; start with ``await TcpProxy(...).start()``."""

    def __init__(self, target_url: str) -> None:
        self.target = urlsplit(target_url)
        self.links: list[_Link] = []
        self.accepted = 0
        self._holding = False
        self._held: list[_Link] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The target's URL with the proxy's address in it."""
        return urlunsplit(self.target._replace(netloc=f"127.0.0.1:{self.port}"))

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.target.hostname is not None and self.target.port is not None
        try:
            upstream = await asyncio.open_connection(self.target.hostname, self.target.port)
        except OSError:
            writer.close()
            return
        self.accepted += 1
        link = _Link((reader, writer), upstream, flowing=not self._holding)
        self.links.append(link)
        if self._holding:
            self._held.append(link)

    def freeze(self) -> int:
        """Stop forwarding on every connection open now; returns how many."""
        frozen = [link for link in self.links if link.flowing.is_set()]
        for link in frozen:
            link.flowing.clear()
        return len(frozen)

    def hold_new(self) -> None:
        """Accept new connections but forward nothing on them until ``release()``."""
        self._holding = True

    def release(self) -> None:
        """Stop holding new connections and let those held so far flow."""
        self._holding = False
        for link in self._held:
            link.flowing.set()
        self._held.clear()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self.links:
            with contextlib.suppress(Exception):
                await link.close()
        if self._server is not None:
            await self._server.wait_closed()
