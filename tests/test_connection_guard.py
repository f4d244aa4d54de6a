"""Hostile and careless connections: slow or huge request heads, too many connections,
slow bodies and deeply nested JSON get a clear answer and cost the gateway little."""

from __future__ import annotations

import asyncio
import resource
import time
from urllib.parse import urlsplit

import httpx
import orjson

from corral.tooling.cluster import LocalCluster
from corral.tooling.fake_ollama import FakeOllamaConfig
from tests.helpers import until

SLOW_HEAD = b"POST /api/generate HTTP/1.1\r\nHost: corral\r\n"


async def _fleet(start_cluster: object, **gateway: object) -> LocalCluster:
    fleet: LocalCluster = await start_cluster(  # type: ignore[operator]
        [FakeOllamaConfig(num_parallel=2)], gateway=gateway
    )
    return fleet


async def _open(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return await asyncio.open_connection(parts.hostname, parts.port)


async def _answer(reader: asyncio.StreamReader, within: float = 10.0) -> tuple[int, bytes]:
    """Status and body of the one answer a refused connection gets, then its EOF."""
    async with asyncio.timeout(within):
        raw = await reader.read()  # to EOF: the gateway closes a refused connection
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def _until_connections(fleet: LocalCluster, at_most: int) -> None:
    assert fleet.gateway is not None
    state = fleet.gateway.server.server_state

    async def few() -> bool:
        return len(state.connections) <= at_most

    await until(few, True)


def _fd_budget(wanted: int) -> int:
    """Slow connections this process can hold: each costs two descriptors here (client and
    in-process gateway), so raise the soft limit as far as the hard one allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 2 * wanted + 1000)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return min(wanted, (target - 1000) // 2)


async def test_slow_heads_are_closed_by_the_header_timeout_while_others_are_served(
    start_cluster: object,
) -> None:
    count = _fd_budget(3000)
    assert count >= 500, "too few file descriptors for a meaningful run"
    fleet = await _fleet(start_cluster, header_timeout=2.0)
    conns = []
    for _ in range(count):
        reader, writer = await _open(fleet.url)
        writer.write(SLOW_HEAD)  # a head that never ends
        conns.append((reader, writer))
    opened = time.monotonic()
    async with httpx.AsyncClient(base_url=fleet.url, timeout=10) as http:
        reply = await http.post(
            "/api/generate", json={"model": "llama3", "prompt": "hi", "stream": False}
        )
        assert reply.status_code == 200, reply.text
        answered_in = time.monotonic() - opened
    assert answered_in < 2.0, "a normal client waited for the slow ones"
    results = await asyncio.gather(*(_answer(reader) for reader, _ in conns))
    assert {status for status, _ in results} == {408}
    assert orjson.loads(results[0][1]) == {"error": "request headers not received within 2s"}
    for _, writer in conns:
        writer.close()
    # and the gateway lets go of every one of them
    await _until_connections(fleet, at_most=1)


async def test_a_head_that_never_ends_gets_431_without_being_buffered(
    start_cluster: object,
) -> None:
    fleet = await _fleet(start_cluster, max_header_bytes=16 * 1024)
    reader, writer = await _open(fleet.url)
    writer.write(SLOW_HEAD + b"X-Endless: ")
    refused = asyncio.ensure_future(_answer(reader))
    for _ in range(64):  # 4 MiB offered in all; refused after the first 16 KiB
        if refused.done():
            break
        try:
            writer.write(b"a" * 65536)
            await writer.drain()
        except ConnectionError:
            break
    status, body = await refused
    assert status == 431
    assert b"request headers too large (limit 16384 bytes)" in body
    writer.close()


async def test_too_many_headers_get_431(start_cluster: object) -> None:
    fleet = await _fleet(start_cluster, max_headers=20)
    async with httpx.AsyncClient(base_url=fleet.url, timeout=10) as http:
        many = {f"x-h{i}": "v" for i in range(30)}
        reply = await http.get("/api/version", headers=many)
        assert reply.status_code == 431
        assert reply.json() == {"error": "too many request headers (limit 20)"}
        few = {f"x-h{i}": "v" for i in range(10)}
        assert (await http.get("/api/version", headers=few)).status_code == 200


async def test_connections_beyond_the_limit_get_503(start_cluster: object) -> None:
    fleet = await _fleet(start_cluster, max_connections=3)
    held = [await _open(fleet.url) for _ in range(3)]
    reader, writer = await _open(fleet.url)
    status, body = await _answer(reader)
    assert status == 503
    assert orjson.loads(body)["error"].startswith("too many connections")
    writer.close()
    for _, w in held:
        w.close()
        await w.wait_closed()
    # Once the others are gone, a new client is served again.
    await _until_connections(fleet, at_most=0)
    async with httpx.AsyncClient(base_url=fleet.url, timeout=10) as http:
        assert (await http.get("/api/version")).status_code == 200


async def test_kept_alive_connections_and_split_heads_are_not_refused(
    start_cluster: object,
) -> None:
    fleet = await _fleet(start_cluster, header_timeout=1.0)
    reader, writer = await _open(fleet.url)
    for _ in range(3):
        # A head split right inside its final CRLFCRLF, the halves a moment apart.
        writer.write(b"GET /api/version HTTP/1.1\r\nHost: corral\r\n\r")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"\n")
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    # Idle between requests longer than the header timeout: still the keep-alive's rules,
    # not a 408 (uvicorn's own keep-alive timeout is 5 s).
    await asyncio.sleep(1.5)
    writer.write(b"GET /api/version HTTP/1.1\r\nHost: corral\r\n\r\n")
    async with asyncio.timeout(5):
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    writer.close()


async def test_a_request_longer_than_the_header_timeout_is_not_cut(
    start_cluster: object,
) -> None:
    """The header timeout covers the head only: a POST whose body comes in a later read and
    whose answer takes longer than the timeout is answered in full."""
    fleet: LocalCluster = await start_cluster(  # type: ignore[operator]
        [FakeOllamaConfig(num_parallel=2, token_rate=10)], gateway={"header_timeout": 0.5}
    )
    reader, writer = await _open(fleet.url)
    body = orjson.dumps(
        {"model": "llama3", "prompt": "slow", "stream": False, "options": {"num_predict": 15}}
    )
    writer.write(
        b"POST /api/generate HTTP/1.1\r\nHost: corral\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    await writer.drain()
    await asyncio.sleep(0.1)  # the body in a read of its own
    writer.write(body)
    async with asyncio.timeout(20):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    writer.close()


async def test_a_slow_body_gets_408(start_cluster: object) -> None:
    fleet = await _fleet(start_cluster, body_timeout=1.0)
    reader, writer = await _open(fleet.url)
    writer.write(
        b"POST /api/generate HTTP/1.1\r\nHost: corral\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"model": '
    )
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    writer.close()


async def test_deeply_nested_json_is_a_400_not_a_500(cluster: LocalCluster) -> None:
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as http:
        for depth in (300, 1000, 5000):
            nested = b"[" * depth + b"]" * depth
            body = b'{"model": "llama3", "prompt": "hi", "options": {"stop": ' + nested + b"}}"
            reply = await http.post("/api/generate", content=body)
            assert reply.status_code == 400, (depth, reply.text)
            assert "deeper than" in reply.json()["error"] or "depth" in reply.json()["error"]
        # brackets inside strings are just text
        text = "[" * 600
        reply = await http.post(
            "/api/generate", json={"model": "llama3", "prompt": text, "stream": False}
        )
        assert reply.status_code == 200, reply.text
