"""SockJS at /ws against the live gateway, with raw HTTP (httpx) and a raw WebSocket (trio-websocket): the
requests sockjs-client makes, answered as sockjs-protocol 0.3.3 and Spring's ``.withSockJS()`` answer them,
with one STOMP connection per SockJS session."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import trio
from conftest import GatewayUnderTest, wait_backends_up, workflow
from trio_websocket import ConnectionClosed, open_websocket_url

from web.sockjs import SockJSConfig

ORIGIN = "http://127.0.0.1:9"  # a page on another origin
NO_COMFY = "http://127.0.0.1:9"  # nothing listens: these tests need no backend


def stomp(command: str, headers: dict[str, str] | None = None, body: str = "") -> str:
    lines = [command] + [f"{k}:{v}" for k, v in (headers or {}).items()]
    return "\n".join(lines) + "\n\n" + body + "\x00"


def session_url(g: GatewayUnderTest) -> str:
    return f"{g.url}/ws/{uuid.uuid4().int % 1000:03d}/{uuid.uuid4().hex}"


def messages(frame: str) -> list[str]:
    assert frame.startswith("a["), frame
    return json.loads(frame[1:].rstrip("\n"))  # type: ignore[no-any-return]


async def poll(http: httpx.AsyncClient, url: str, **kw: Any) -> str:
    r = await http.post(f"{url}/xhr", **kw)
    assert r.status_code == 200, r.text
    return r.text


async def send(http: httpx.AsyncClient, url: str, *msgs: str) -> None:
    r = await http.post(f"{url}/xhr_send", content=json.dumps(list(msgs)), headers={"Origin": ORIGIN})
    assert r.status_code == 204, r.text
    assert r.text == "" and r.headers["content-type"] == "text/plain;charset=UTF-8"


async def poll_stomp(http: httpx.AsyncClient, url: str, want: str) -> list[str]:
    """STOMP frames polled until one starting with ``want`` arrives (heart-beats skipped)."""
    got: list[str] = []
    with trio.fail_after(15):
        while not any(f.startswith(want) for f in got):
            frame = await poll(http, url)
            if frame.startswith("a"):
                got += [f for m in messages(frame) for f in m.split("\x00") if f.strip("\n")]
    return [f.lstrip("\n") for f in got]


async def test_info_and_cors(start_gateway: Any) -> None:
    g = await start_gateway([NO_COMFY])
    r1 = await g.http.get(f"{g.url}/ws/info", headers={"Origin": ORIGIN})
    assert r1.status_code == 200
    assert r1.headers["content-type"] == "application/json;charset=UTF-8"
    assert r1.headers["access-control-allow-origin"] == ORIGIN  # echoed, never "*": SockJS sends credentials
    assert r1.headers["access-control-allow-credentials"] == "true"
    assert r1.headers["cache-control"] == "no-store, no-cache, no-transform, must-revalidate, max-age=0"
    body = r1.json()
    assert {k: body[k] for k in ("websocket", "origins", "cookie_needed")} == {
        "websocket": True,
        "origins": ["*:*"],
        "cookie_needed": False,
    }
    r2 = await g.http.get(f"{g.url}/ws/info")
    assert isinstance(body["entropy"], int) and body["entropy"] != r2.json()["entropy"]
    pre = await g.http.options(
        f"{g.url}/ws/000/abc/xhr_send",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == ORIGIN
    assert pre.headers["access-control-allow-credentials"] == "true"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert pre.headers["access-control-allow-headers"] == "content-type"
    assert int(pre.headers["access-control-max-age"]) > 1_000_000
    greeting = await g.http.get(f"{g.url}/ws")
    assert greeting.text == "Welcome to SockJS!\n"


async def test_disallowed_origin_is_refused(start_gateway: Any) -> None:
    g = await start_gateway([NO_COMFY], web={"allowed_origins": ("http://good.example",)})
    assert (await g.http.get(f"{g.url}/ws/info", headers={"Origin": "http://evil.example"})).status_code == 403
    url = session_url(g)
    assert (await g.http.post(f"{url}/xhr", headers={"Origin": "http://evil.example"})).status_code == 403
    ok = await g.http.post(f"{url}/xhr", headers={"Origin": "http://good.example"})
    assert ok.text == "o\n" and ok.headers["access-control-allow-origin"] == "http://good.example"


async def test_xhr_polling_carries_a_stomp_session_end_to_end(start_gateway: Any, sim: Any) -> None:
    g = await start_gateway([sim.url])
    await wait_backends_up(g)
    url = session_url(g)
    r = await g.http.post(f"{url}/xhr", headers={"Origin": ORIGIN})
    assert (r.text, r.headers["content-type"]) == ("o\n", "application/javascript;charset=UTF-8")
    assert r.headers["access-control-allow-origin"] == ORIGIN
    # sockjs-client sends each STOMP frame as one message; a frame may also be split over messages
    connect = stomp(
        "CONNECT",
        {
            "accept-version": "1.1,1.0",
            "heart-beat": "0,0",
            "clientId": "sj-1",
            "Authorization": f"Bearer {g.token('alice')}",
        },
    )
    await send(g.http, url, connect[:20], connect[20:])
    frames = await poll_stomp(g.http, url, "CONNECTED")
    assert "user-name:alice" in frames[0] and "version:1.1" in frames[0]
    await send(
        g.http,
        url,
        stomp("SUBSCRIBE", {"id": "sub-0", "destination": "/user/topic/messages"}),
        stomp("SEND", {"destination": "/app/tasks"}, json.dumps({"workflow": workflow("txt2img")})),
    )
    seen: list[dict[str, Any]] = []
    seqs: list[int] = []
    with trio.fail_after(20):
        while not any(m["type"] == "completed" for m in seen):
            for f in await poll_stomp(g.http, url, "MESSAGE"):
                if f.startswith("MESSAGE"):
                    head, body = f.split("\n\n", 1)
                    seqs += [int(h[4:]) for h in head.split("\n") if h.startswith("seq:")]
                    seen.append(json.loads(body))
    types = [m["type"] for m in seen]
    assert types.index("queued") < types.index("progress") < types.index("imageResult") < types.index("completed")
    assert seqs == list(range(1, len(seqs) + 1))  # nothing lost or reordered across polls
    # DISCONNECT with a receipt: the RECEIPT, then the SockJS close frame for every later poll
    await send(g.http, url, stomp("DISCONNECT", {"receipt": "bye"}))
    assert any(f.startswith("RECEIPT") for f in await poll_stomp(g.http, url, "RECEIPT"))
    assert await poll(g.http, url) == 'c[1000,"disconnect"]\n'
    assert await poll(g.http, url) == 'c[1000,"disconnect"]\n'


async def test_xhr_send_errors(start_gateway: Any) -> None:
    g = await start_gateway([NO_COMFY])
    url = session_url(g)
    r = await g.http.post(f"{url}/xhr_send", content='["x"]')
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert await poll(g.http, url) == "o\n"
    r = await g.http.post(f"{url}/xhr_send", content='["x')
    assert (r.status_code, r.text) == (500, "Broken JSON encoding.")
    r = await g.http.post(f"{url}/xhr_send", content="")
    assert (r.status_code, r.text) == (500, "Payload expected.")
    assert (await g.http.post(f"{url}/xhr_send", content="[]")).status_code == 204
    big = await g.http.post(f"{url}/xhr_send", content=b'["' + b"x" * (2 << 20) + b'"]', headers={"Origin": ORIGIN})
    assert big.status_code == 413 and big.json()["error"] == "too_large"
    assert big.headers["access-control-allow-origin"] == ORIGIN  # the page can read why
    assert (await g.http.get(f"{url}/websocket")).status_code == 400
    assert (await g.http.post(f"{url}/nope")).status_code == 404
    assert (await g.http.get(f"{g.url}/ws/a./b/xhr")).status_code == 404


async def test_abandoned_session_times_out_and_frees_its_stomp_slot(start_gateway: Any) -> None:
    g = await start_gateway(
        # disconnect_delay: long enough that a loaded machine's pause between two requests is not "abandoned"
        [NO_COMFY],
        web={"sockjs": SockJSConfig(disconnect_delay=2.0), "max_connections_per_user": 1},
    )
    connect = stomp(
        "CONNECT",
        {"accept-version": "1.2", "heart-beat": "0,0", "clientId": "c", "Authorization": f"Bearer {g.token('bob')}"},
    )
    url = session_url(g)
    assert await poll(g.http, url) == "o\n"
    await send(g.http, url, connect)
    assert (await poll_stomp(g.http, url, "CONNECTED"))[0].startswith("CONNECTED")
    assert "gateway_sockjs_sessions 1.0" in (await g.http.get(f"{g.url}/metrics")).text
    # the client stops polling: the session and its STOMP connection end after disconnect_delay, so the
    # one connection bob may have is free again for a new session
    with trio.fail_after(30):
        while (await g.http.post(f"{url}/xhr_send", content='["\\n"]')).status_code != 404:
            await trio.sleep(0.1)
    assert "gateway_sockjs_sessions 0.0" in (await g.http.get(f"{g.url}/metrics")).text
    url2 = session_url(g)
    assert await poll(g.http, url2) == "o\n"
    await send(g.http, url2, connect)
    assert (await poll_stomp(g.http, url2, "CONNECTED"))[0].startswith("CONNECTED")


async def test_heartbeat_frame_on_idle_poll(start_gateway: Any) -> None:
    g = await start_gateway([NO_COMFY], web={"sockjs": SockJSConfig(heartbeat=0.2)})
    url = session_url(g)
    assert await poll(g.http, url) == "o\n"
    assert await poll(g.http, url) == "h\n"


async def test_xhr_streaming_prelude_frames_and_response_limit(start_gateway: Any) -> None:
    g = await start_gateway([NO_COMFY], web={"sockjs": SockJSConfig(stream_limit=4096)})
    url = session_url(g)
    async with g.http.stream("POST", f"{url}/xhr_streaming", headers={"Origin": ORIGIN}) as resp:
        assert resp.headers["content-type"] == "application/javascript;charset=UTF-8"
        assert resp.headers["access-control-allow-credentials"] == "true"
        chunks = resp.aiter_text()
        buf = ""
        while "o\n" not in buf:
            buf += await chunks.__anext__()
        assert buf == "h" * 2048 + "\n" + "o\n"
        # a CONNECT without a token: the ERROR frame and the close frame arrive on the stream, which then ends
        await send(g.http, url, stomp("CONNECT", {"accept-version": "1.2", "heart-beat": "0,0"}))
        rest = "".join([c async for c in chunks])
    frames = rest.split("\n")
    assert messages(frames[0])[0].startswith("ERROR\n") and "unauthorized" in messages(frames[0])[0]
    assert frames[1] == 'c[1008,"unauthorized"]' and frames[2:] == [""]


async def test_eventsource_transport(start_gateway: Any) -> None:
    g = await start_gateway([NO_COMFY])
    url = session_url(g)
    async with g.http.stream("GET", f"{url}/eventsource") as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        chunks = resp.aiter_text()
        buf = ""
        while "data: o" not in buf:
            buf += await chunks.__anext__()
        assert buf == "\r\ndata: o\r\n\r\n"


async def test_websocket_transport(start_gateway: Any) -> None:
    g = await start_gateway([NO_COMFY])
    ws_url = session_url(g).replace("http://", "ws://") + "/websocket"
    with trio.fail_after(10):
        async with open_websocket_url(ws_url) as ws:
            assert await ws.get_message() == "o"
            await ws.send_message("")  # ignored
            await ws.send_message("[]")  # ignored
            await ws.send_message(
                json.dumps(
                    [
                        stomp(
                            "CONNECT",
                            {
                                "accept-version": "1.2",
                                "heart-beat": "0,0",
                                "Authorization": f"Bearer {g.token('carol')}",
                            },
                        )
                    ]
                )
            )
            frame = await ws.get_message()
            assert messages(frame)[0].startswith("CONNECTED\n")
        async with open_websocket_url(ws_url) as ws:  # a session id may be reused for a new WebSocket
            assert await ws.get_message() == "o"
            await ws.send_message('["a')  # broken JSON ends the session
            frames = []
            try:
                while True:
                    frames.append(await ws.get_message())
            except ConnectionClosed:
                pass
            assert messages(frames[0])[0].startswith("ERROR\n") and frames[-1].startswith("c[1002,")
