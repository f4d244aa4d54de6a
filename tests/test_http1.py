"""The worker's HTTP/1.1 client against scripted servers on real sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from corral.errors import BackendError
from worker.http1 import Http1Client, HttpFailure
from worker.ollama import OllamaClient

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A TCP server that counts connections and hands each to ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed_by_client = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        finally:
            writer.close()


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """The body of the next request on the connection, or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return await reader.readexactly(length)


def reply(body: bytes, status: str = "200 OK") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@pytest.fixture
async def echo() -> AsyncIterator[Server]:
    """Answers every request on a connection with its own body (keep-alive)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (body := await read_request(reader)) is not None:
            writer.write(reply(body))
            await writer.drain()

    async with Server(handler) as server:
        yield server


def client(url: str, read_timeout: float = 5.0) -> Http1Client:
    return Http1Client(url, connect_timeout=2.0, read_timeout=read_timeout)


async def test_requests_reuse_one_kept_alive_connection(echo: Server) -> None:
    http = client(echo.url)
    try:
        for n in range(5):
            async with http.request("POST", "/api/x", b'{"n":%d}' % n) as resp:
                assert resp.status == 200
                assert await resp.read() == b'{"n":%d}' % n
    finally:
        await http.aclose()
    assert echo.connections == 1


async def test_chunked_body_arrives_piece_by_piece_and_the_next_piece_waits() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            b'Transfer-Encoding: chunked\r\n\r\n6\r\n{"a":1\r\n'
        )
        await writer.drain()
        await release.wait()
        writer.write(b"2\r\n}\n\r\n0\r\n\r\n")
        await writer.drain()
        await read_request(reader)

    async with Server(handler) as server:
        ollama = OllamaClient(server.url, connect_timeout=2, read_timeout=5, slots=1)
        try:
            lines = ollama.stream_lines("/api/generate", b"{}")
            first = asyncio.ensure_future(anext(lines))
            done, _ = await asyncio.wait([first], timeout=0.2)
            assert not done, "no full line yet: the client must wait for the rest"
            release.set()
            assert await first == b'{"a":1}'
            assert [line async for line in lines] == []
        finally:
            await ollama.aclose()


async def test_a_kept_alive_connection_the_server_closed_is_replaced_transparently() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = await read_request(reader)
        writer.write(reply(body or b""))  # keep-alive promised...
        await writer.drain()
        await read_request(reader)  # ...but the next request is dropped unanswered

    async with Server(handler) as server:
        http = client(server.url)
        try:
            for n in range(3):
                async with http.request("POST", "/", b"%d" % n) as resp:
                    assert await resp.read() == b"%d" % n
        finally:
            await http.aclose()
        assert server.connections == 3


async def test_leaving_mid_body_closes_the_connection_so_the_server_sees_it() -> None:
    gone = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{}\n\r\n")
        await writer.drain()
        if await reader.read(1) == b"":
            gone.set()

    async with Server(handler) as server:
        ollama = OllamaClient(server.url, connect_timeout=2, read_timeout=5, slots=1)
        try:
            lines = ollama.stream_lines("/api/generate", b"{}")
            assert await anext(lines) == b"{}"
            await lines.aclose()  # what a cancelled job does
            async with asyncio.timeout(5):
                await gone.wait()
        finally:
            await ollama.aclose()


async def test_failures_map_to_retriable_backend_errors() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    refused = OllamaClient(f"http://127.0.0.1:{port}", connect_timeout=2, read_timeout=5, slots=1)
    with pytest.raises(BackendError) as info:
        await refused.post("/api/embed", b"{}")
    assert info.value.status == 502 and info.value.retriable

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # never answers

    async with Server(silent) as server:
        slow = OllamaClient(server.url, connect_timeout=2, read_timeout=0.2, slots=1)
        try:
            with pytest.raises(BackendError) as info:
                await slow.post("/api/embed", b"{}")
            assert info.value.status == 504 and info.value.retriable
        finally:
            await slow.aclose()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SPDY/9 what\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with Server(garbage) as server:
        http = client(server.url)
        try:
            with pytest.raises(HttpFailure):
                async with http.request("GET", "/"):
                    pass
        finally:
            await http.aclose()


async def test_ollama_errors_keep_their_status_and_message() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(reply(b'{"error":"model \\"x\\" not found"}', "404 Not Found"))
            await writer.drain()

    async with Server(handler) as server:
        ollama = OllamaClient(server.url, connect_timeout=2, read_timeout=5, slots=1)
        try:
            with pytest.raises(BackendError) as info:
                await ollama.post("/api/show", b'{"model":"x"}')
            assert info.value.status == 404 and not info.value.retriable
            assert info.value.message == 'model "x" not found'
        finally:
            await ollama.aclose()


async def test_connections_beyond_max_idle_are_closed_not_kept(echo: Server) -> None:
    http = Http1Client(echo.url, connect_timeout=2.0, read_timeout=5.0, max_idle=1)

    async def one(n: int) -> bytes:
        async with http.request("POST", "/", b"%d" % n) as resp:
            return await resp.read()

    try:
        assert await asyncio.gather(one(1), one(2), one(3)) == [b"1", b"2", b"3"]
        assert echo.connections == 3  # three at once need three connections
        assert len(http._idle) == 1
        assert await one(4) == b"4"
        assert echo.connections == 3  # the kept one was reused
    finally:
        await http.aclose()


def test_host_header_and_path_prefix_follow_the_url() -> None:
    assert Http1Client("http://ollama:11434", connect_timeout=1, read_timeout=1).host_header == (
        "ollama:11434"
    )
    v6 = Http1Client("http://[::1]:11434/", connect_timeout=1, read_timeout=1)
    assert v6.host == "::1" and v6.host_header == "[::1]:11434"
    proxied = Http1Client("https://gpu.example/ollama/", connect_timeout=1, read_timeout=1)
    assert proxied.host_header == "gpu.example" and proxied.port == 443
    assert proxied._head("GET", "/api/tags", None).startswith(b"GET /ollama/api/tags HTTP/1.1\r\n")
