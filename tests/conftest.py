"""Shared fixtures: the ComfyUI simulator and the whole gateway on free ports (127.0.0.1 only)."""

from __future__ import annotations

import gc
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from _redis_server import RedisServer

import web.server
from actors.comfy import ComfyTimeouts, RestartPolicy
from actors.gateway import GatewayConfig
from web.config import WebConfig
from web.server import Running, serve_gateway

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"  # ComfyUI transcripts and workflows (see tests/data/README.md)
TRANSCRIPTS = DATA / "comfyui-transcripts"
WORKFLOWS = DATA / "workflows"
TEST_SECRET = b"test-secret-0123456789-abcdefghijklmnop"


def workflow(name: str) -> dict[str, Any]:
    """A workflow from tests/data/workflows (or tests/data/comfyui-transcripts/workflows)."""
    for folder in (WORKFLOWS, TRANSCRIPTS / "workflows"):
        path = folder / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
    raise FileNotFoundError(name)


@dataclass
class GatewayUnderTest:
    running: Running
    shutdown: trio.Event
    done: trio.Event
    http: httpx.AsyncClient
    initial_credits: int
    price: int
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def ws_url(self) -> str:
        return self.running.url.replace("http://", "ws://") + "/ws"

    def token(self, user: str, **kw: Any) -> str:
        return self.running.auth.issue(user, **kw)

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user)}"}

    async def submit(self, user: str, wf: dict[str, Any], client_id: str = "c1", size: int = 1) -> dict[str, Any]:
        r = await self.http.post(
            f"{self.url}/api/tasks", json={"clientId": client_id, "workflow": wf, "size": size}, headers=self.auth(user)
        )
        assert r.status_code == 202, r.text
        return r.json()

    async def balance(self, user: str) -> dict[str, Any]:
        r = await self.http.get(f"{self.url}/api/balance", headers=self.auth(user))
        assert r.status_code == 200, r.text
        return r.json()

    async def stop(self) -> None:
        self.shutdown.set()
        with trio.fail_after(10):
            await self.done.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the session (free port, own directory); tests flush it as they start."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


STORES = ("sqlite", "redis")
both_stores = pytest.mark.usefixtures("store_kind")  # a test marked so runs once on SQLite, once on Redis


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    """Parametrizes a test over both stores (``pytestmark = pytest.mark.usefixtures("store_kind")`` does a module);
    ``store_spec`` and ``start_gateway`` then use the store it names."""
    return str(request.param)


@pytest.fixture
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """What ``open_store``/``--store`` take for this test: an empty Redis db (flushed now) when the test runs on
    Redis, else DATA/gateway.db under ``tmp_path``."""
    if "store_kind" in request.fixturenames and request.getfixturevalue("store_kind") == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.flush()
        return server.url()
    return str(tmp_path / "data" / "gateway.db")


FAST_RECONNECT = RestartPolicy(initial_delay=0.05, max_delay=0.5, max_restarts=1000, window=60.0, healthy_after=5.0)


@pytest.fixture
async def sim(nursery: trio.Nursery) -> Any:
    from fake_comfyui import FakeComfyUI

    s = FakeComfyUI(step_ms=5, seed=1)
    await nursery.start(s.serve)
    return s


@pytest.fixture
async def start_gateway(nursery: trio.Nursery, tmp_path: Path, store_spec: str) -> AsyncIterator[Callable[..., Any]]:
    started: list[GatewayUnderTest] = []
    async with httpx.AsyncClient(timeout=15) as http:

        async def start(
            comfy_urls: list[str], *, data: Path | None = None, web: dict[str, Any] | None = None, **overrides: Any
        ) -> GatewayUnderTest:
            # on Redis, ``data`` is ignored: the test's one Redis db is its data (a restart finds it again)
            path = str(data / "gateway.db") if data is not None and not store_spec.startswith("redis") else store_spec
            gw_kw: dict[str, Any] = dict(
                comfyui_urls=tuple(comfy_urls),
                store_path=path,
                initial_credits=100,
                price=3,
                comfy_policy=FAST_RECONNECT,
                comfy_timeouts=ComfyTimeouts(http=10, first_status=5, ping_interval=5, ping_timeout=5, slow_retry=1),
            )
            gw_kw.update(overrides)
            gw = GatewayConfig(**gw_kw)
            web_cfg = WebConfig(bind="127.0.0.1:0", **(web or {}))
            shutdown, done = trio.Event(), trio.Event()

            async def run(task_status: trio.TaskStatus[Running]) -> None:
                try:
                    await serve_gateway(gw, web_cfg, secret=TEST_SECRET, shutdown=shutdown, task_status=task_status)
                finally:
                    done.set()

            running = await nursery.start(run)
            g = GatewayUnderTest(running, shutdown, done, http, gw.initial_credits, gw.price)
            started.append(g)
            return g

        yield start
        for g in started:
            g.shutdown.set()


async def wait_backends_up(g: GatewayUnderTest, n: int = 1, timeout: float = 10) -> None:
    """Wait for a ``status`` broadcast saying ``n`` backends are up (a new subscriber gets the current one)."""
    from stomp_client import stomp_connect

    async with stomp_connect(g.ws_url, token=g.token("observer"), client_id="observer") as c:
        await c.subscribe("/topic/messages", "status")
        await c.collect_until(lambda m: m.get("type") == "status" and m["backends"]["up"] >= n, timeout=timeout)


@pytest.fixture
def thawed() -> Iterator[None]:
    """For a test that freezes the collector's view (``gc.freeze``, directly or through web._gc's policy): the
    process is thawed after it, as the other tests expect it."""
    yield
    gc.unfreeze()


@pytest.fixture
def apps(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every app ``serve_gateway`` builds, so a test can reach its endpoint, sessions hub and metrics (``parts``)."""
    made: list[Any] = []
    real = web.server.create_app

    def spy(*args: Any, **kw: Any) -> Any:
        made.append(real(*args, **kw))
        return made[-1]

    monkeypatch.setattr(web.server, "create_app", spy)
    return made


def parts(app: Any) -> dict[str, Any]:
    return app.extensions["gateway"]  # type: ignore[no-any-return]
