"""The live dashboard in a real browser: Debian's Chromium driven by Playwright.

A fleet of two nodes (one a separate ``corral worker`` process, so it can be killed
outright) under load; the page must show every live node, redraw a graph as its data
changes, turn the killed node red within its TTL, log no console error, and fit a phone's
width. Screenshots are kept under ``test-artifacts/`` (``CORRAL_TEST_ARTIFACTS``).

Playwright is pointed at the system's Chromium (``.ci/run`` installs it with apt-get):
it never downloads a browser. Skipped, saying why, only where no Chromium is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import ollama
import pytest

from corral.tooling.cluster import LocalCluster
from corral.tooling.fake_ollama import FakeOllamaConfig, start_fake_ollama

StartCluster = Callable[..., Awaitable[LocalCluster]]

NODE_TTL = 3.0
ARTIFACTS = Path(os.environ.get("CORRAL_TEST_ARTIFACTS", "test-artifacts"))


def chromium() -> str:
    found = os.environ.get("CORRAL_CHROMIUM") or next(
        (p for name in ("chromium", "chromium-browser") if (p := shutil.which(name))), None
    )
    if not found:
        pytest.skip(
            "no Chromium installed (apt-get install chromium; .ci/run does it): "
            "the dashboard's browser test cannot run"
        )
    return found


async def _load(url: str, stop: asyncio.Event) -> None:
    """Requests one after another on two connections until told to stop."""

    async def one_client() -> None:
        async with ollama.AsyncClient(host=url) as client:
            while not stop.is_set():
                await client.generate(model="llama3", prompt="hi", options={"num_predict": 4})

    await asyncio.gather(one_client(), one_client())


@contextlib.asynccontextmanager
async def killable_worker(redis_url: str) -> AsyncIterator[subprocess.Popen[bytes]]:
    """A ``corral worker`` process (node ``victim``) over its own fake Ollama.

    It serves a model the load does not ask for: a job it held when killed would wait for
    a scheduler to reclaim it, and this fleet runs none."""
    fake = await start_fake_ollama(FakeOllamaConfig(models=["qwen2:0.5b"], num_parallel=1))
    env = {
        **os.environ,
        "CORRAL_REDIS_URL": redis_url,
        "CORRAL_OLLAMA_URL": fake.url,
        "CORRAL_NODE_ID": "victim",
        "CORRAL_HEARTBEAT_INTERVAL": "0.5",
        "CORRAL_NODE_TTL": str(NODE_TTL),
        "CORRAL_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "worker"], env=env, stdin=subprocess.DEVNULL
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        await fake.stop()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.mark.timeout(180)  # a browser's start and a node's TTL on a loaded machine
async def test_dashboard_in_chromium(
    start_cluster: StartCluster, redis_url: str, artifacts: Path
) -> None:
    executable = chromium()
    playwright_api = pytest.importorskip(
        "playwright.async_api", reason="playwright is in the dev extra: pip install -e '.[dev]'"
    )
    cluster = await start_cluster(
        [FakeOllamaConfig(num_parallel=2, token_rate=400)],
        gateway={"node_ttl": NODE_TTL},
        worker={"node_ttl": NODE_TTL},
    )
    stop = asyncio.Event()
    errors: list[str] = []
    async with killable_worker(redis_url) as victim:
        load = asyncio.create_task(_load(cluster.url, stop))
        try:
            async with playwright_api.async_playwright() as pw:
                browser = await pw.chromium.launch(
                    executable_path=executable, args=["--no-sandbox", "--disable-gpu"]
                )
                page = await browser.new_page(viewport={"width": 1280, "height": 1400})
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                await page.goto(f"{cluster.url}/status")

                # Every live node is shown (the victim registers within a heartbeat or two).
                for node in ("node1", "victim"):
                    await page.wait_for_selector(f'tr[data-node="{node}"]', timeout=20_000)
                assert await page.get_attribute('tr[data-node="node1"]', "data-state") == "running"

                # The requests graph has data, and its data changes between two reads.
                graph = 'svg[data-graph="requests"]'
                await page.wait_for_function(
                    f"Number(document.querySelector('{graph}')?.dataset.sum) > 0",
                    timeout=20_000,
                )
                first = await page.get_attribute(graph, "data-sum")
                await page.wait_for_function(
                    f"document.querySelector('{graph}').dataset.sum !== {first!r}",
                    timeout=20_000,
                )
                for graph_id in ("queued", "wait", "total", "slots", "tokens"):
                    assert await page.query_selector(f'svg[data-graph="{graph_id}"]')
                await page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)

                # A node killed outright turns red within its TTL (plus a poll or two).
                victim.kill()
                await page.wait_for_selector(
                    'tr[data-node="victim"].down', timeout=int((NODE_TTL + 6) * 1000)
                )
                assert await page.get_attribute('tr[data-node="node1"]', "class") == ""
                await page.screenshot(
                    path=str(artifacts / "dashboard-node-down.png"), full_page=True
                )

                # Dark by the browser's preference, and a phone's width without sideways
                # scrolling of the page (wide tables scroll inside their own box).
                await page.emulate_media(color_scheme="dark")
                await page.set_viewport_size({"width": 390, "height": 844})
                background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
                assert background == "rgb(17, 19, 24)", background
                overflow = await page.evaluate(
                    "document.documentElement.scrollWidth - window.innerWidth"
                )
                assert overflow <= 0, f"page is {overflow}px wider than a phone"
                await page.screenshot(path=str(artifacts / "dashboard-phone-dark.png"))
                await browser.close()
        finally:
            stop.set()
            await asyncio.wait([load], timeout=30)
            if not load.done():
                load.cancel()
            await asyncio.gather(load, return_exceptions=True)
    assert errors == [], errors


@pytest.mark.timeout(120)
async def test_dashboard_behind_keys_asks_the_browser_for_one(
    start_cluster: StartCluster, artifacts: Path
) -> None:
    """With keys configured the page answers 401 with a Basic challenge; a browser given
    the admin key as the password loads it and every figure, a user key is refused."""
    executable = chromium()
    playwright_api = pytest.importorskip(
        "playwright.async_api", reason="playwright is in the dev extra: pip install -e '.[dev]'"
    )
    cluster = await start_cluster(
        [FakeOllamaConfig(num_parallel=2)], gateway={"api_keys": "admin-secret-key-1"}
    )
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as http:
        asked = await http.get("/status")
        assert asked.status_code == 401
        assert asked.headers["www-authenticate"].startswith("Basic realm=")
        assert (await http.get("/status.json", auth=("me", "admin-secret-key-1"))).is_success
        assert (await http.get("/status", auth=("me", "wrong"))).status_code == 401
    errors: list[str] = []
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-gpu"]
        )
        context = await browser.new_context(
            http_credentials={"username": "operator", "password": "admin-secret-key-1"}
        )
        page = await context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(f"{cluster.url}/status")
        await page.wait_for_selector('tr[data-node="node1"]', timeout=20_000)
        await page.screenshot(path=str(artifacts / "dashboard-with-keys.png"), full_page=True)
        await browser.close()
    assert errors == [], errors
