"""The worker's Ollama client (``corral.worker.ollama``) against raw asyncio TCP servers.

The servers are scripted byte by byte (no HTTP framework), so each test controls exactly
what reaches the wire and when a connection closes.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from corral.errors import BackendError
from corral.worker.ollama import OllamaClient

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A TCP server that counts connections and hands each to ``handler``."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1") -> None:
        self.handler = handler
        self.host = host
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, self.host, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except ConnectionError:
            pass  # the client went away; what a test checks is recorded before
        finally:
            writer.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """(request line, body) of the next request on the connection, or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return head.split(b"\r\n", 1)[0], await reader.readexactly(length)


def reply(body: bytes, status: str = "200 OK") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def ollama(url: str, *, read_timeout: float = 10.0, slots: int = 1) -> OllamaClient:
    return OllamaClient(url, connect_timeout=2.0, read_timeout=read_timeout, slots=slots)


@pytest.fixture
async def echo() -> AsyncIterator[Server]:
    """Answers every request on a connection with its body, or ``{}`` (keep-alive)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            writer.write(reply(request[1] or b"{}"))
            await writer.drain()

    async with Server(handler) as server:
        yield server


async def test_sequential_calls_share_one_kept_alive_connection(echo: Server) -> None:
    client = ollama(echo.url)
    try:
        for n in range(3):
            assert await client.post("/api/embed", b'{"n":%d}' % n) == b'{"n":%d}' % n
            assert await client.get_json("/api/ps") == {}
            lines = [line async for line in client.stream_lines("/api/generate", b"{}\n{}")]
            assert lines == [b"{}", b"{}"]
    finally:
        await client.aclose()
    assert echo.connections == 1


async def test_chunked_ndjson_arrives_piece_by_piece_and_the_next_piece_waits() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            b'Transfer-Encoding: chunked\r\n\r\n6\r\n{"a":1\r\n'
        )
        await writer.drain()
        await release.wait()
        writer.write(b'9\r\n}\n{"b":2}\r\n3\r\n\n\n\n\r\n0\r\n\r\n')
        await writer.drain()
        await read_request(reader)

    async with Server(handler) as server:
        client = ollama(server.url)
        try:
            lines = client.stream_lines("/api/generate", b"{}")
            first = asyncio.ensure_future(anext(lines))
            done, _ = await asyncio.wait([first], timeout=0.2)
            assert not done, "no full line yet: the client must wait for the rest"
            release.set()
            assert await first == b'{"a":1}'
            assert [line async for line in lines] == [b'{"b":2}']
        finally:
            await client.aclose()


async def test_a_post_on_a_stale_kept_alive_connection_is_not_sent_again() -> None:
    """The server reads the second POST whole, then closes without answering.

    The generation may be running: the client must report a retriable failure, never
    re-send the POST on a new connection.
    """
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await read_request(reader)
        assert first is not None
        seen.append(first[1])
        writer.write(reply(b"{}"))  # keep-alive promised...
        await writer.drain()
        second = await read_request(reader)
        if second is not None:
            seen.append(second[1])  # ...but this one is dropped unanswered

    async with Server(handler) as server:
        client = ollama(server.url)
        try:
            assert await client.post("/api/embed", b'{"n":1}') == b"{}"
            with pytest.raises(BackendError) as info:
                await client.post("/api/embed", b'{"n":2}')
            assert info.value.retriable and info.value.status == 502

            assert await client.post("/api/embed", b'{"n":3}') == b"{}"  # a fresh one
            with pytest.raises(BackendError) as info:
                async for _ in client.stream_lines("/api/generate", b'{"n":4}'):
                    pass
            assert info.value.retriable and info.value.status == 502
        finally:
            await client.aclose()
    assert seen == [b'{"n":1}', b'{"n":2}', b'{"n":3}', b'{"n":4}']
    assert server.connections == 2


async def test_a_get_on_a_stale_kept_alive_connection_is_answered_on_a_new_one() -> None:
    """GETs are idempotent: aiohttp may, and does, send them once more."""
    answered = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        await read_request(reader)
        answered += 1
        writer.write(reply(b'{"models":[]}'))
        await writer.drain()
        await read_request(reader)  # the next one is dropped unanswered

    async with Server(handler) as server:
        client = ollama(server.url)
        try:
            for _ in range(3):
                assert await client.get_json("/api/ps") == {"models": []}
        finally:
            await client.aclose()
    assert answered == 3
    assert server.connections == 3


async def test_leaving_a_stream_early_closes_the_connection_so_ollama_sees_it() -> None:
    gone = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{}\n\r\n")
        await writer.drain()
        if await reader.read(1) == b"":
            gone.set()

    async with Server(handler) as server:
        client = ollama(server.url)
        try:
            lines = client.stream_lines("/api/generate", b"{}")
            assert await anext(lines) == b"{}"
            await lines.aclose()  # what a cancelled job does
            async with asyncio.timeout(5):
                await gone.wait()
        finally:
            await client.aclose()


async def test_cancelling_a_task_mid_stream_closes_the_connection() -> None:
    gone = asyncio.Event()
    first_line = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{}\n\r\n")
        await writer.drain()
        if await reader.read(1) == b"":
            gone.set()

    async def consume(client: OllamaClient) -> None:
        async for _ in client.stream_lines("/api/generate", b"{}"):
            first_line.set()

    async with Server(handler) as server:
        client = ollama(server.url)
        try:
            task = asyncio.create_task(consume(client))
            async with asyncio.timeout(5):
                await first_line.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            async with asyncio.timeout(5):
                await gone.wait()
        finally:
            await client.aclose()


async def test_connections_are_capped_at_one_per_slot_and_a_few_spare() -> None:
    release = asyncio.Event()
    open_now = 0
    reached = asyncio.Event()
    cap = 2 + 4  # slots + spare

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now
        open_now += 1
        if open_now == cap:
            reached.set()
        await release.wait()
        while await read_request(reader) is not None:
            writer.write(reply(b"{}"))
            await writer.drain()

    async with Server(handler) as server:
        client = ollama(server.url, slots=2)
        try:
            calls = [asyncio.create_task(client.get_json("/api/ps")) for _ in range(cap + 3)]
            async with asyncio.timeout(5):
                await reached.wait()
            release.set()
            assert await asyncio.gather(*calls) == [{}] * (cap + 3)
        finally:
            await client.aclose()
        assert server.connections == cap


async def test_unreachable_ollama_is_a_retriable_502() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = ollama(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(BackendError) as info:
            await client.post("/api/embed", b"{}")
        assert info.value.status == 502 and info.value.retriable
    finally:
        await client.aclose()


async def test_a_connect_that_hangs_times_out_as_a_retriable_504() -> None:
    # A listener that never accepts, its queue already full: the kernel drops new SYNs,
    # so the client's connect hangs until its own timeout.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        fillers: list[socket.socket] = []
        try:
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(address)
                fillers.append(filler)
            client = OllamaClient(
                f"http://127.0.0.1:{address[1]}", connect_timeout=0.3, read_timeout=30, slots=1
            )
            started = time.monotonic()
            try:
                with pytest.raises(BackendError) as info:
                    await client.get_json("/api/tags")
            finally:
                await client.aclose()
        finally:
            for filler in fillers:
                filler.close()
    assert info.value.status == 504 and info.value.retriable
    assert time.monotonic() - started < 10


async def test_a_silent_ollama_times_out_on_read_as_a_retriable_504() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # never answers

    async with Server(silent) as server:
        client = ollama(server.url, read_timeout=0.2)
        try:
            with pytest.raises(BackendError) as info:
                await client.post("/api/embed", b"{}")
            assert info.value.status == 504 and info.value.retriable
        finally:
            await client.aclose()


async def test_a_stream_that_stalls_mid_body_times_out_as_a_retriable_504() -> None:
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{}\n\r\n")
        await writer.drain()
        await reader.read()

    async with Server(stalls) as server:
        client = ollama(server.url, read_timeout=0.2)
        try:
            lines: list[bytes] = []
            with pytest.raises(BackendError) as info:
                async for line in client.stream_lines("/api/generate", b"{}"):
                    lines.append(line)
            assert lines == [b"{}"]
            assert info.value.status == 504 and info.value.retriable
        finally:
            await client.aclose()


async def test_a_per_call_timeout_bounds_the_whole_call() -> None:
    """The heartbeat's ``/api/ps`` must not wait out the long read timeout."""

    async def half_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            # Headers and part of the body, then nothing: only a total limit ends this.
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{"models":')
            await writer.drain()

    async with Server(half_answer) as server:
        client = ollama(server.url, read_timeout=60)
        try:
            started = time.monotonic()
            with pytest.raises(BackendError) as info:
                await client.get_json("/api/ps", timeout=0.3)
            assert info.value.status == 504 and info.value.retriable
            with pytest.raises(BackendError) as info:
                await client.post("/api/show", b"{}", timeout=0.3)
            assert info.value.status == 504 and info.value.retriable
            assert time.monotonic() - started < 10
        finally:
            await client.aclose()


async def test_an_answer_that_is_not_http_is_a_retriable_502() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SPDY/9 what\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with Server(garbage) as server:
        client = ollama(server.url)
        try:
            with pytest.raises(BackendError) as info:
                await client.get_json("/api/tags")
            assert info.value.status == 502 and info.value.retriable
            with pytest.raises(BackendError) as info:
                async for _ in client.stream_lines("/api/generate", b"{}"):
                    pass
            assert info.value.status == 502 and info.value.retriable
        finally:
            await client.aclose()


async def test_a_200_that_is_not_json_is_a_retriable_502() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(reply(b"<html>a proxy's page</html>"))
            await writer.drain()

    async with Server(handler) as server:
        client = ollama(server.url)
        try:
            with pytest.raises(BackendError) as info:
                await client.get_json("/api/ps")
            assert info.value.status == 502 and info.value.retriable
        finally:
            await client.aclose()


async def test_a_4xx_keeps_ollamas_status_and_message_and_is_final() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(reply(b'{"error":"model \\"x\\" not found"}', "404 Not Found"))
            await writer.drain()

    async with Server(handler) as server:
        client = ollama(server.url)
        try:
            with pytest.raises(BackendError) as info:
                await client.post("/api/show", b'{"model":"x"}')
            assert info.value.status == 404 and not info.value.retriable
            assert info.value.message == 'model "x" not found'
            with pytest.raises(BackendError) as info:
                async for _ in client.stream_lines("/api/generate", b'{"model":"x"}'):
                    pass
            assert info.value.status == 404 and not info.value.retriable
        finally:
            await client.aclose()
        assert server.connections == 1  # an error answer read whole keeps the connection


async def test_a_5xx_is_retriable_with_ollamas_status_and_message() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(reply(b"runner crashed", "500 Internal Server Error"))
            await writer.drain()

    async with Server(handler) as server:
        client = ollama(server.url)
        try:
            with pytest.raises(BackendError) as info:
                await client.get_json("/api/ps")
            assert info.value.status == 500 and info.value.retriable
            assert info.value.message == "runner crashed"
        finally:
            await client.aclose()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) here")
async def test_an_ipv6_loopback_url_works() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            seen.append(request[0])
            writer.write(reply(b'{"version":"0.0.0"}'))
            await writer.drain()

    async with Server(handler, host="::1") as server:
        assert server.url.startswith("http://[::1]:")
        client = ollama(server.url + "/")
        try:
            assert await client.get_json("/api/version") == {"version": "0.0.0"}
        finally:
            await client.aclose()
    assert seen == [b"GET /api/version HTTP/1.1"]
