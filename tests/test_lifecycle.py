"""Task lifecycle in depth (issue 4), end to end over real sockets: the whole gateway on a free port against one or
two ComfyUI simulators on free ports.

Several backends and one lost for good; a prompt finishing while our socket is down; a ComfyUI restart that forgets
everything; fair dispatch across users; cancel in every state (refunded exactly once, checked in the ledger's
journal); deadlines; previews, results and image URLs; the same-clientId trap and a silent socket; the idle GPU
time between prompts. Waiting is always for a message or a condition, under a ``trio.fail_after`` net.
At the end, the comfy actor's activity watchdog alone, in exact virtual seconds (MockClock).
"""

from __future__ import annotations

import base64
import collections
import copy
import json
import statistics
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio
import trio.testing
from trio_websocket import WebSocketConnection, open_websocket_url

from actors.comfy import BackendLost, BackendUp, ComfyTimeouts, PromptAccepted, SubmitPrompt
from actors.store import open_store
from conftest import ROOT, GatewayUnderTest, both_stores, wait_backends_up, workflow
from fake_comfyui import FakeComfyUI
from stomp_client import StompClient
from test_e2e_skeleton import PNG_SIGNATURE, TERMINAL, start_sim, subscribed

TIMEOUTS = dict(http=10, first_status=5, ping_interval=5, ping_timeout=5, slow_retry=1)


def txt2img(*, steps: int | None = None, sleep_ms: int | None = None, prefix: str | None = None) -> dict[str, Any]:
    """The standard graph with another step count, a slow VAE decode (no progress meanwhile) or filename prefix."""
    wf = copy.deepcopy(workflow("txt2img"))
    if steps is not None:
        wf["3"]["inputs"]["steps"] = steps
    if sleep_ms is not None:
        wf["8"]["inputs"]["sim_sleep_ms"] = sleep_ms
    if prefix is not None:
        wf["9"]["inputs"]["filename_prefix"] = prefix
    return wf


async def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    """Until ``condition()`` holds (the simulator's own state: it has no events to wait on)."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.005)


async def task_view(g: GatewayUnderTest, user: str, task_id: str) -> dict[str, Any]:
    r = await g.http.get(f"{g.url}/api/tasks/{task_id}", headers=g.auth(user))
    assert r.status_code == 200, r.text
    return r.json()


async def until_terminal(c: StompClient, task_ids: set[str], timeout: float = 20,
                         into: list[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The terminal message of each task; every message on the way is appended to ``into`` if given."""
    ends: dict[str, dict[str, Any]] = {}

    def done(m: dict[str, Any]) -> bool:
        if m.get("taskId") in task_ids and m.get("type") in TERMINAL:
            ends[m["taskId"]] = m
        return set(ends) == task_ids

    got = await c.collect_until(done, timeout=timeout)
    if into is not None:
        into.extend(m for _, m in got)
    return ends


@asynccontextmanager
async def stomp(g: GatewayUnderTest, user: str, client_id: str = "c1") -> AsyncIterator[StompClient]:
    """A STOMP client (as ``stomp_connect``) whose socket reader never blocks on unread messages, so leaving with
    messages still unread does not stall trio-websocket's close handshake (its reader would wait on a full queue)."""
    async with open_websocket_url(g.ws_url, subprotocols=["v12.stomp"], message_queue_size=100_000) as ws:
        c = StompClient(ws)
        await c.send_frame("CONNECT", {"accept-version": "1.2", "heart-beat": "0,0", "clientId": client_id,
                                       "Authorization": f"Bearer {g.token(user)}"})
        frame = await c.next_frame()
        assert frame.command == "CONNECTED", frame
        yield c


async def journal(store_spec: str, task_id: str) -> list[str]:
    """The ledger journal's kinds for a task (freeze, then exactly one settle or release), read from the store the
    gateway runs on (a second connection, as an operator's audit would)."""
    async with open_store(store_spec) as store:
        return [j.kind for j in await store.journal() if j.task_id == task_id]


async def metric(g: GatewayUnderTest, name: str) -> float:
    text = (await g.http.get(f"{g.url}/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


# ---- several backends -------------------------------------------------------------------------------------------


@both_stores
async def test_two_backends_share_work_and_survive_one_killed_for_good(nursery: trio.Nursery, start_gateway: Any,
                                                                      store_spec: str) -> None:
    s0, _ = await start_sim(nursery)
    s1, kill_s1 = await start_sim(nursery)
    g = await start_gateway([s0.url, s1.url], max_inflight=2, backend_lost_after=1.0)
    await wait_backends_up(g, 2)
    s0.pause()
    s1.pause()
    async with stomp(g, "alice") as c, \
            stomp(g, "observer", "o") as observer:
        await subscribed(c)
        await observer.subscribe("/topic/messages", "status")
        first = [(await g.submit("alice", workflow("txt2img"), "c1"))["taskId"] for _ in range(4)]
        await wait_until(lambda: len(s0.submitted) + len(s1.submitted) == 4)
        assert len(s0.submitted) == 2 and len(s1.submitted) == 2  # least-loaded backend: spread over both
        prompt_of = {(await task_view(g, "alice", t))["prompt_id"]: t for t in first}
        on_s1 = {prompt_of[p] for p in s1.submitted}

        kill_s1.cancel()  # b1 dies for good with two prompts inside
        s0.resume()
        later = [(await g.submit("alice", workflow("txt2img"), "c1"))["taskId"] for _ in range(2)]
        ends = await until_terminal(c, set(first) | set(later))

        for t in on_s1:  # b1's tasks end after backend_lost_after, refunded
            assert ends[t]["type"] == "execution_error" and ends[t]["reason"] == "backend_lost", ends[t]
            assert ends[t]["refunded"] is True and await journal(store_spec, t) == ["freeze", "release"]
        for t in set(first) - on_s1 | set(later):  # everything else ran on b0, the new ones included
            assert ends[t]["type"] == "completed" and await journal(store_spec, t) == ["freeze", "settle"]
        assert len(s0.submitted) == 4 and len(s0.runs) == 4
        await observer.collect_until(lambda m: m.get("type") == "status" and m["backends"] == {"up": 1, "total": 2})
    ready = await g.http.get(f"{g.url}/readyz")
    assert ready.status_code == 200 and ready.json()["backends"] == {"up": 1, "total": 2}
    assert await g.balance("alice") == {"userId": "alice", "balance": g.initial_credits - 4 * g.price, "frozen": 0,
                                         "available": g.initial_credits - 4 * g.price}


# ---- reconciliation ---------------------------------------------------------------------------------------------


@both_stores
async def test_prompt_finished_while_socket_down_is_completed_from_history(nursery: trio.Nursery,
                                                                           start_gateway: Any) -> None:
    sim, _ = await start_sim(nursery, step_ms=20)
    g = await start_gateway([sim.url])
    await wait_backends_up(g)
    async with stomp(g, "alice") as c:
        await subscribed(c)
        task = (await g.submit("alice", workflow("txt2img"), "c1"))["taskId"]
        await c.collect_until(lambda m: m.get("type") == "progress")
        pid = (await task_view(g, "alice", task))["prompt_id"]
        sim.refuse_websockets = True
        sim.drop_sockets()  # the gateway's socket is cut mid-run and cannot come back ...
        await wait_until(lambda: any(r.prompt_id == pid for r in sim.runs))
        assert not sim._sockets  # ... so the prompt finished with nobody listening: its events were dropped
        sim.refuse_websockets = False
        msgs = await c.collect_until(lambda m: m.get("taskId") == task and m.get("type") in TERMINAL)
    mine = [m for _, m in msgs if m.get("taskId") == task]
    assert [m["type"] for m in mine if m["type"] in ("imageResult", "completed")] == ["imageResult", "completed"]
    done = mine[-1]
    assert done["type"] == "completed" and len(done["urls"]) == 1
    image = await g.http.get(done["urls"][0], headers=g.auth("alice"))
    assert image.status_code == 200 and image.content.startswith(PNG_SIGNATURE)
    assert (await g.balance("alice"))["balance"] == g.initial_credits - g.price


@both_stores
async def test_restart_that_forgets_queue_and_history_loses_inflight_tasks(nursery: trio.Nursery, start_gateway: Any,
                                                                          store_spec: str) -> None:
    sim, kill = await start_sim(nursery, step_ms=20)
    port = sim.port
    g = await start_gateway([sim.url], max_inflight=2)
    await wait_backends_up(g)
    async with stomp(g, "alice") as c:
        await subscribed(c)
        running = (await g.submit("alice", txt2img(steps=500), "c1"))["taskId"]
        pending = (await g.submit("alice", txt2img(steps=500), "c1"))["taskId"]
        await c.collect_until(lambda m: m.get("type") == "progress" and m["taskId"] == running)
        await wait_until(lambda: len(sim.submitted) == 2)
        kill.cancel()  # one running, one pending inside ComfyUI; a fresh one comes up on the same port
        fresh, _ = await start_sim(nursery, port=port)
        ends = await until_terminal(c, {running, pending})
        for t in (running, pending):
            assert ends[t]["type"] == "execution_error" and ends[t]["reason"] == "backend_lost"
            assert ends[t]["refunded"] is True and await journal(store_spec, t) == ["freeze", "release"]
        assert fresh.submitted == []  # reconciled, never submitted again
        nxt = (await g.submit("alice", workflow("txt2img"), "c1"))["taskId"]
        assert (await until_terminal(c, {nxt}))[nxt]["type"] == "completed"
    assert await g.balance("alice") == {"userId": "alice", "balance": g.initial_credits - g.price, "frozen": 0,
                                         "available": g.initial_credits - g.price}


@both_stores
async def test_same_client_id_trap_is_detected_by_the_missing_status(sim: FakeComfyUI, start_gateway: Any) -> None:
    g = await start_gateway([sim.url], comfy_timeouts=ComfyTimeouts(**TIMEOUTS, status_after_submit=0.5))
    await wait_backends_up(g)
    [gateway_id] = list(sim._sockets)
    # Someone opens a second socket with the gateway's clientId and closes it: ComfyUI then forgets the gateway's
    # socket too, which stays open (and answers pings) but hears nothing any more.
    async with open_websocket_url(f"ws://127.0.0.1:{sim.port}/ws?clientId={gateway_id}") as intruder:
        await intruder.get_message()
    await wait_until(lambda: gateway_id not in sim._sockets)
    assert len(sim._connections) == 1  # the gateway's deaf socket
    async with stomp(g, "alice") as c:
        await subscribed(c)
        task = (await g.submit("alice", workflow("txt2img"), "c1"))["taskId"]
        ends = await until_terminal(c, {task}, timeout=10)
    assert ends[task]["type"] == "completed" and ends[task]["urls"]
    assert gateway_id in sim._sockets and await metric(g, "gateway_backend_reconnects{") >= 1


@both_stores
async def test_silent_socket_while_work_is_queued_is_reconnected(sim: FakeComfyUI, start_gateway: Any) -> None:
    g = await start_gateway([sim.url], comfy_timeouts=ComfyTimeouts(**TIMEOUTS, silence=0.3))
    await wait_backends_up(g)
    async with stomp(g, "alice") as c:
        await subscribed(c)
        task = (await g.submit("alice", txt2img(sleep_ms=1500), "c1"))["taskId"]  # 1.5 s without a frame
        ends = await until_terminal(c, {task}, timeout=10)
    assert ends[task]["type"] == "completed" and len(ends[task]["urls"]) == 1
    assert await metric(g, "gateway_backend_reconnects{") >= 1


# ---- fair queue and caps ----------------------------------------------------------------------------------------


@both_stores
async def test_one_users_batch_delays_another_users_task_by_at_most_one_dispatch(sim: FakeComfyUI,
                                                                                 start_gateway: Any) -> None:
    g = await start_gateway([sim.url], max_inflight=2)
    await wait_backends_up(g)
    sim.pause()
    async with stomp(g, "alice") as a, \
            stomp(g, "bob") as b:
        await subscribed(a)
        await subscribed(b)
        batch = [(await g.submit("alice", workflow("txt2img"), "c1"))["taskId"] for _ in range(10)]
        await wait_until(lambda: len(sim.submitted) == 2)  # two inside ComfyUI, eight waiting in our queue
        assert (await task_view(g, "alice", batch[-1]))["position"] == 8
        single = await g.submit("bob", workflow("txt2img"), "c1")
        assert single["position"] == 2  # behind alice's next one only
        assert (await task_view(g, "bob", single["taskId"]))["position"] == 2
        bob_prompt = (await task_view(g, "bob", single["taskId"]))["prompt_id"]
        sim.resume()
        await until_terminal(b, {single["taskId"]})
        await until_terminal(a, set(batch), timeout=30)
    dispatched_after = sim.submitted[2:]
    assert bob_prompt in dispatched_after[:2], dispatched_after.index(bob_prompt)


@both_stores
async def test_queued_cap_per_user_is_429_and_rejected(start_gateway: Any) -> None:
    with trio.socket.socket() as s:  # a backend nobody listens on: tasks stay queued
        await s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    g = await start_gateway([dead], max_queued_per_user=2)
    ids = [(await g.submit("alice", workflow("txt2img"), "c1"))["taskId"] for _ in range(2)]
    assert [(await task_view(g, "alice", t))["position"] for t in ids] == [1, 2]
    r = await g.http.post(f"{g.url}/api/tasks", json={"clientId": "c1", "workflow": workflow("txt2img")},
                          headers=g.auth("alice"))
    assert r.status_code == 429 and r.json()["error"] == "too_many_tasks"
    async with stomp(g, "alice") as c:
        await subscribed(c)
        await c.send_frame("SEND", {"destination": "/app/tasks"}, json.dumps({"workflow": workflow("txt2img")}))
        msgs = await c.collect_until(lambda m: m.get("type") == "rejected")
    assert msgs[-1][1]["error"] == "too_many_tasks"
    assert (await g.submit("bob", workflow("txt2img"), "c1"))["position"] == 2  # the cap is per user; round robin
    assert (await g.http.get(f"{g.url}/readyz")).status_code == 503
    assert (await g.balance("alice"))["frozen"] == 2 * g.price


# ---- cancel -------------------------------------------------------------------------------------------------------


@both_stores
async def test_cancel_queued_comfy_queued_and_running_each_refunded_once(sim: FakeComfyUI, start_gateway: Any,
                                                                         store_spec: str) -> None:
    g = await start_gateway([sim.url], max_inflight=2)
    await wait_backends_up(g)
    sim.pause()
    async with stomp(g, "alice") as a, \
            stomp(g, "bob") as b:
        await subscribed(a)
        await subscribed(b)
        running = (await g.submit("alice", txt2img(steps=2000), "c1"))["taskId"]
        in_comfy = (await g.submit("alice", workflow("txt2img"), "c1"))["taskId"]
        queued = (await g.submit("alice", workflow("txt2img"), "c1"))["taskId"]
        bobs = (await g.submit("bob", workflow("txt2img"), "c1"))["taskId"]
        await wait_until(lambda: len(sim.submitted) == 2)
        pid = {t: (await task_view(g, "alice", t))["prompt_id"] for t in (running, in_comfy)}

        async def delete(user: str, task_id: str) -> tuple[int, dict[str, Any]]:
            r = await g.http.delete(f"{g.url}/api/tasks/{task_id}", headers=g.auth(user))
            return r.status_code, r.json()

        assert await delete("bob", queued) == (404, {"error": "not_found", "detail": f"no task {queued}"})
        assert (await delete("alice", queued))[0] == 200  # still in our queue: removed at once
        status, body = await delete("alice", in_comfy)  # inside ComfyUI's queue: deleted there
        assert (status, body["state"]) == (202, "cancelling")
        await until_terminal(a, {queued, in_comfy})
        assert pid[in_comfy] not in [item[2].prompt_id for item in sim._pending]

        sim.resume()
        await a.collect_until(lambda m: m.get("type") == "progress" and m["taskId"] == running)
        await b.send_frame("SEND", {"destination": "/app/cancel"}, json.dumps({"taskId": running}))  # not bob's
        assert (await b.collect_until(lambda m: m.get("type") == "rejected"))[-1][1]["error"] == "not_found"
        await a.send_frame("SEND", {"destination": "/app/cancel"}, json.dumps({"taskId": running}))
        ends = await until_terminal(a, {running})
        assert (await until_terminal(b, {bobs}))[bobs]["type"] == "completed"

    assert ends[running] == {"type": "cancelled", "taskId": running, "refunded": True}
    assert await delete("alice", running) == (409, {"error": "finished", "detail": f"task {running} has already finished"})
    for t in (queued, in_comfy, running):
        assert (await task_view(g, "alice", t))["state"] == "cancelled"
        assert await journal(store_spec, t) == ["freeze", "release"]  # exactly one refund each
    outcome = {r.prompt_id: r.outcome for r in sim.runs}
    assert outcome[pid[running]] == "interrupted" and pid[in_comfy] not in outcome
    assert set(sim.interrupts) <= {pid[running], pid[in_comfy]}  # targeted: never anyone else's prompt
    assert list(outcome.values()).count("success") == 1  # bob's
    assert await g.balance("alice") == {"userId": "alice", "balance": g.initial_credits, "frozen": 0,
                                         "available": g.initial_credits}


# ---- deadlines ----------------------------------------------------------------------------------------------------


@both_stores
async def test_task_past_its_deadline_is_interrupted_and_refunded(sim: FakeComfyUI, start_gateway: Any,
                                                                  store_spec: str) -> None:
    g = await start_gateway([sim.url], task_timeout=0.5)
    await wait_backends_up(g)
    async with stomp(g, "alice") as c:
        await subscribed(c)
        task = (await g.submit("alice", txt2img(steps=2000), "c1"))["taskId"]  # 10 s of work
        ends = await until_terminal(c, {task})
    err = ends[task]
    assert err["type"] == "execution_error" and err["reason"] == "timeout" and err["refunded"] is True
    pid = (await task_view(g, "alice", task))["prompt_id"]
    assert sim.interrupts == [pid]  # ComfyUI was told to interrupt exactly that prompt
    assert [(r.prompt_id, r.outcome) for r in sim.runs] == [(pid, "interrupted")]
    assert await journal(store_spec, task) == ["freeze", "release"]
    view = await task_view(g, "alice", task)
    assert view["state"] == "failed" and view["reason"] == "timeout"


# ---- previews and results -----------------------------------------------------------------------------------------


@both_stores
async def test_previews_and_paged_results_with_public_urls(sim: FakeComfyUI, start_gateway: Any) -> None:
    public = "https://gw.example/comfy"  # behind a proxy: URLs name the gateway's public address, never ComfyUI
    g = await start_gateway([sim.url], public_url=public)
    await wait_backends_up(g)
    async with stomp(g, "alice") as c:
        await subscribed(c)
        tasks = [(await g.submit("alice", txt2img(steps=4, prefix=f"gw/t{i}"), "c1"))["taskId"] for i in range(3)]
        msgs: list[dict[str, Any]] = []
        ends = await until_terminal(c, set(tasks), into=msgs)
    assert all(e["type"] == "completed" for e in ends.values())
    previews = [m for m in msgs if m["type"] == "preview"]
    assert {m["taskId"] for m in previews} == set(tasks)
    for m in previews:
        assert m["mime"] == "image/png" and base64.b64decode(m["data"]).startswith(PNG_SIGNATURE) and m["prompt_id"]

    page = (await g.http.get(f"{g.url}/api/results?limit=2", headers=g.auth("alice"))).json()
    assert [r["taskId"] for r in page["results"]] == [tasks[2], tasks[1]]  # newest first
    rest = (await g.http.get(f"{g.url}/api/results?limit=2&before={page['next']}", headers=g.auth("alice"))).json()
    assert [r["taskId"] for r in rest["results"]] == [tasks[0]] and "next" not in rest
    for result in page["results"] + rest["results"]:
        assert result["state"] == "succeeded" and len(result["urls"]) == 1
        url = result["urls"][0]
        assert url.startswith(f"{public}/api/images/{result['taskId']}/")
        local = g.url + url.removeprefix(public)
        # a browser's Origin is not forwarded to ComfyUI (which would answer 403 to a foreign one)
        image = await g.http.get(local, headers={**g.auth("alice"), "Origin": "http://app.example"})
        assert image.status_code == 200 and image.content.startswith(PNG_SIGNATURE)
        assert (await g.http.get(local, headers=g.auth("bob"))).status_code == 404
    assert (await g.http.get(f"{g.url}/api/results", headers=g.auth("bob"))).json() == {"results": []}


# ---- no idle GPU --------------------------------------------------------------------------------------------------


async def test_gaps_between_prompts_stay_at_noise_level_with_max_inflight_2() -> None:
    from gaps import measure_gaps  # scripts/gaps.py

    two = await measure_gaps(backends=2, tasks=8, max_inflight=2, steps=20, step_ms=20)
    one = await measure_gaps(backends=1, tasks=4, max_inflight=1, steps=20, step_ms=20)
    gaps_two = [gap for gaps in two.values() for gap in gaps]
    assert set(two) == {"b0", "b1"} and len(gaps_two) == 6
    assert max(gaps_two) < 0.005, gaps_two  # the next prompt was already queued inside ComfyUI
    assert statistics.median(one["b0"]) > max(gaps_two)  # without it, every gap holds a gateway round trip


async def test_gaps_script_prints_per_backend_gaps() -> None:
    result = await trio.run_process(
        [sys.executable, str(ROOT / "scripts" / "gaps.py"), "--backends", "2", "--tasks", "4", "--steps", "2"],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert "max-inflight 2, 4 tasks on 2 backend(s)" in out and "b0: 1 gaps" in out and "b1: 1 gaps" in out


def test_cli_flags_for_lost_backends_and_per_user_inflight(monkeypatch: Any) -> None:
    from web.cli import build_parser

    args = build_parser().parse_args(["serve", "--backend-lost-after", "42", "--max-inflight-per-user", "3"])
    assert (args.backend_lost_after, args.max_inflight_per_user) == (42.0, 3)
    monkeypatch.setenv("GATEWAY_BACKEND_LOST_AFTER", "7.5")
    monkeypatch.setenv("GATEWAY_MAX_INFLIGHT_PER_USER", "2")
    args = build_parser().parse_args(["serve"])
    assert (args.backend_lost_after, args.max_inflight_per_user) == (7.5, 2)


# ---- the comfy actor's activity watchdog, alone (MockClock, scripted fake ComfyUI from test_comfy_actor) ----------


async def test_no_frame_after_an_accepted_submit_means_a_deaf_socket(autojump_clock: trio.testing.MockClock) -> None:
    from test_comfy_actor import FakeComfy, actor, respond, stay

    fake = FakeComfy(scripts=collections.deque([stay]))  # accepts our prompts but never broadcasts a status
    fake.routes[("POST", "/prompt")] = respond(httpx.Response(200, json={"prompt_id": "p-1", "number": 1}))
    async with actor(fake, timeouts=ComfyTimeouts(status_after_submit=10)) as h:
        assert await h.next() == (0, BackendUp("b0", 0))
        await trio.sleep(3)
        await h.inbox.send(SubmitPrompt("t-1", "p-1", {}))
        assert await h.next() == (3, PromptAccepted("b0", "t-1", "p-1", 1))
        assert await h.next() == (13, BackendLost("b0", "no status within 10s of an accepted submit"))
        assert await h.next() == (13.5, BackendUp("b0", 0))  # redialled (the old socket closed first)
    assert len(fake.sockets) == 2 and fake.max_open_same_client == 1


async def test_a_status_after_the_submit_keeps_the_socket(autojump_clock: trio.testing.MockClock) -> None:
    from test_comfy_actor import FakeComfy, Socket, actor, hello, idle, respond
    from test_comfy_actor import status as status_frame

    queued = trio.Event()

    async def comfy(ws: WebSocketConnection, sock: Socket) -> None:
        await hello(ws, sock)
        await queued.wait()
        await ws.send_message(status_frame(1))  # ComfyUI's broadcast for the new prompt (after its HTTP answer)
        await idle(ws)

    async def accept(request: httpx.Request) -> httpx.Response:
        queued.set()
        return httpx.Response(200, json={"prompt_id": "p-1", "number": 1})

    fake = FakeComfy(scripts=collections.deque([comfy]))
    fake.routes[("POST", "/prompt")] = accept
    async with actor(fake, timeouts=ComfyTimeouts(status_after_submit=10, silence=120)) as h:
        await h.next()
        await h.inbox.send(SubmitPrompt("t-1", "p-1", {}))
        got = [await h.next(), await h.next()]
        assert sorted(type(r).__name__ for _, r in got) == ["BackendEvent", "PromptAccepted"]
        await trio.sleep(100)  # work queued, but 100 s of silence is within `silence`
        assert h.reports.statistics().current_buffer_used == 0 and len(fake.sockets) == 1
        assert await h.next() == (120, BackendLost("b0", "silent socket: nothing for 120s while ComfyUI has work queued"))
        assert (await h.next())[1] == BackendUp("b0", 0)


async def test_an_idle_comfyui_may_stay_silent(autojump_clock: trio.testing.MockClock) -> None:
    from test_comfy_actor import FakeComfy, actor, stay

    fake = FakeComfy(scripts=collections.deque([stay]))
    async with actor(fake, timeouts=ComfyTimeouts(silence=5)) as h:
        assert await h.next() == (0, BackendUp("b0", 0))
        await trio.sleep(1000)  # queue_remaining 0: nothing is expected, pings are answered
        assert len(fake.sockets) == 1 and h.counters.statistics().connected
