"""The lean ``POST /prompt`` client (``actors/comfy/_http11.py``) against a scripted HTTP/1.1 server on 127.0.0.1:
keep-alive reuse, a stale idle connection replaced (never a request sent twice), failures as httpx's exceptions and
so as ``HTTPFailed`` through ``_commands.request``, the whole-request deadline, and bodies as httpx reads them."""

from __future__ import annotations

import gzip
import json
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import httpx
import pytest
import trio
import trio.testing

from actors.comfy._commands import HTTPFailed, request
from actors.comfy._http11 import Http11Client

Answer = Callable[[int, dict[str, Any]], Awaitable[tuple[int, list[tuple[str, str]], bytes] | None]]


class Server:
    """Each request's answer comes from ``answer(connection number, request)``: (status, headers, body), or None to
    close the connection without answering. ``requests`` records (connection number, method, target, JSON body)."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[tuple[int, str, str, Any]] = []
        self.connections = 0
        self.close_after_answer = False  # close each connection after one answer (without saying so)
        self.port = 0

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        n = self.connections
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                req, body = None, b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        if not data and conn.their_state is h11.IDLE:
                            return
                        conn.receive_data(data)
                    elif isinstance(event, h11.Request):
                        req = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
                assert req is not None
                self.requests.append((n, req.method.decode(), req.target.decode(), json.loads(body) if body else None))
                answer = await self.answer(n, {"headers": dict(req.headers), "body": body})
                if answer is None:
                    return
                status, headers, content = answer
                await stream.send_all(
                    conn.send(h11.Response(status_code=status, headers=headers)) + conn.send(h11.Data(data=content))
                    if content
                    else conn.send(h11.Response(status_code=status, headers=headers))
                )
                await stream.send_all(conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE or self.close_after_answer:
                    return
                conn.start_next_cycle()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def ok(body: dict[str, Any], *extra: tuple[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
    data = json.dumps(body).encode()
    return 200, [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *extra], data


async def echo(n: int, req: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
    return ok({"number": n, "prompt_id": json.loads(req["body"])["prompt_id"], "node_errors": {}})


async def started(answer: Answer, nursery: trio.Nursery) -> Server:
    server = Server(answer)
    await nursery.start(server.serve)
    return server


async def test_requests_reuse_one_keep_alive_connection_and_send_the_json_as_httpx_does() -> None:
    async with trio.open_nursery() as nursery:
        server = await started(echo, nursery)
        client = Http11Client(server.url)
        body = {"prompt": {"3": {"inputs": {"text": "café ☕", "x": 1.5}}}, "client_id": "c", "prompt_id": "p1"}
        for i in range(3):
            r = await client.request("POST", "/prompt", json_body=dict(body, prompt_id=f"p{i}"))
            assert r.status_code == 200 and r.json() == {"number": 1, "prompt_id": f"p{i}", "node_errors": {}}
        assert server.connections == 1 and client.connects == 1
        assert [(n, m, t) for n, m, t, _ in server.requests] == [(1, "POST", "/prompt")] * 3
        sent = httpx.Request("POST", server.url + "/prompt", json=body)
        r = await client.request("POST", "/prompt", json_body=body)
        assert server.requests[-1][3] == body
        client.close()
        nursery.cancel_scope.cancel()
    assert sent.content == json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


async def test_an_idle_connection_the_server_closed_is_replaced_and_nothing_is_sent_twice() -> None:
    async with trio.open_nursery() as nursery:
        server = await started(echo, nursery)
        server.close_after_answer = True  # as a server whose keep-alive timeout ran out
        client = Http11Client(server.url)
        for i in range(3):
            await client.request("POST", "/prompt", json_body={"prompt_id": f"p{i}"})
            await trio.testing.wait_all_tasks_blocked()  # the server has closed that connection
        assert [p for _, _, _, p in server.requests] == [{"prompt_id": f"p{i}"} for i in range(3)]
        assert server.connections == 3 == client.connects
        client.close()
        nursery.cancel_scope.cancel()


async def test_an_idle_connection_past_the_keepalive_expiry_is_not_reused(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        server = await started(echo, nursery)
        client = Http11Client(server.url, keepalive_expiry=5.0)
        await client.request("POST", "/prompt", json_body={"prompt_id": "a"})
        await trio.sleep(4.0)
        await client.request("POST", "/prompt", json_body={"prompt_id": "b"})
        assert client.connects == 1
        await trio.sleep(6.0)
        await client.request("POST", "/prompt", json_body={"prompt_id": "c"})
        assert client.connects == 2
        client.close()
        nursery.cancel_scope.cancel()


async def test_a_server_that_closes_without_answering_is_httpfailed_and_its_connection_dropped() -> None:
    async def drop_first(n: int, req: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes] | None:
        return None if n == 1 else await echo(n, req)

    async with trio.open_nursery() as nursery:
        server = await started(drop_first, nursery)
        client = Http11Client(server.url)
        with pytest.raises(HTTPFailed, match="POST /prompt: RemoteProtocolError"):
            await request(client, "unused", "POST", "/prompt", timeout=5.0, json_body={"prompt_id": "a"})
        r = await client.request("POST", "/prompt", json_body={"prompt_id": "b"})  # not retried: a new connection
        assert r.json()["number"] == 2
        assert [p["prompt_id"] for _, _, _, p in server.requests] == ["a", "b"]
        client.close()
        nursery.cancel_scope.cancel()


async def test_no_server_is_a_connect_error() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nobody listens there now
    client = Http11Client(f"http://127.0.0.1:{port}")
    with pytest.raises(HTTPFailed, match="POST /prompt: ConnectError"):
        await request(client, "unused", "POST", "/prompt", timeout=5.0, json_body={})


async def test_the_whole_request_deadline_holds_and_the_connection_is_not_reused(autojump_clock: Any) -> None:
    release = trio.Event()

    async def slow_first(n: int, req: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes] | None:
        if n == 1:
            await release.wait()
        return await echo(n, req)

    async with trio.open_nursery() as nursery:
        server = await started(slow_first, nursery)
        client = Http11Client(server.url)
        with pytest.raises(HTTPFailed, match=r"POST /prompt: no answer within 30\.0s"):
            await request(client, "unused", "POST", "/prompt", timeout=30.0, json_body={"prompt_id": "a"})
        r = await client.request("POST", "/prompt", json_body={"prompt_id": "b"})
        assert r.json()["number"] == 2  # the timed-out connection was closed, not handed out again
        release.set()
        client.close()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("answer", "status", "text", "parsed"),
    [
        ((500, [("Content-Type", "text/plain; charset=utf-8")], "boom é".encode()), 500, "boom é", ValueError),
        (
            (400, [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")], b'{"error": 1}'),
            400,
            None,
            {"error": 1},
        ),
        ((200, [("Content-Encoding", "gzip")], gzip.compress(b'{"number": 3}')), 200, None, {"number": 3}),
        ((200, [("Connection", "close")], b'{"number": 4}'), 200, None, {"number": 4}),
        ((307, [("Location", "/elsewhere")], b""), 307, "", ValueError),
    ],
)
async def test_answers_read_as_httpx_reads_them(
    answer: tuple[int, list[tuple[str, str]], bytes], status: int, text: str | None, parsed: Any
) -> None:
    async def fixed(n: int, req: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
        return answer

    async with trio.open_nursery() as nursery:
        server = await started(fixed, nursery)
        client = Http11Client(server.url)
        async with httpx.AsyncClient() as http:
            theirs = await http.post(server.url + "/prompt", json={})
        mine = await client.request("POST", "/prompt", json_body={})
        assert mine.status_code == theirs.status_code == status  # redirects are not followed by either
        assert mine.content == theirs.content
        assert mine.text == theirs.text
        if text is not None:
            assert mine.text == text
        for response in (mine, theirs):
            if parsed is ValueError:
                with pytest.raises(json.JSONDecodeError):
                    response.json()
            else:
                assert response.json() == parsed
        closing = ("Connection", "close") in answer[1]
        await client.request("POST", "/prompt", json_body={})
        assert client.connects == (2 if closing else 1)
        client.close()
        nursery.cancel_scope.cancel()


def test_usable_only_for_plain_http_without_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    assert Http11Client.usable("http://127.0.0.1:8188")
    assert not Http11Client.usable("https://comfy.example:8188")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    assert not Http11Client.usable("http://127.0.0.1:8188")
    with pytest.raises(ValueError, match="plain http://"):
        Http11Client("https://comfy.example")
