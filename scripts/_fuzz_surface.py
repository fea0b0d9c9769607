"""The whole gateway surface under fuzzed input: hypothesis strategies and an in-process harness.

Shared by ``tests/test_fuzz_surface.py`` (bounded, in CI) and ``scripts/fuzz.py`` (long runs). The harness runs
the real actors and the real Quart app in this process: most inputs go through Quart's in-process test client
(HTTP requests and the STOMP endpoint over an in-process WebSocket, so the real codec and ``web/_ws.py`` run
without socket costs), and every ``socket_every``-th input also through a real Hypercorn socket on 127.0.0.1.

Properties checked per input: every HTTP request is answered with a status the contract names (never 500) and a
JSON error body; every STOMP frame is answered (a probe ``RECEIPT`` after it arrives, or an ``ERROR`` frame that
is not "internal error" before the socket closes). At the end: the ledger audit is clean and /healthz answers.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio
from hypothesis import strategies as st

from actors import ledger
from actors.gateway import GatewayConfig, Handles, run_gateway
from web.app import create_app
from web.auth import Authenticator
from web.config import WebConfig

HTTP_OK = {200, 202, 400, 401, 402, 403, 404, 409, 413, 429}
TXT2IMG = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 1,
            "steps": 2,
            "cfg": 7,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    },
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "fuzz", "images": ["8", 0]}},
}

# ---- strategies ---------------------------------------------------------------------------------------------

ODD_TEXT = st.text(st.characters(codec=None, categories=None), max_size=40)  # surrogates, NUL, RTL, emoji...
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**53, max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | ODD_TEXT
)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(ODD_TEXT, inner, max_size=5), max_leaves=30
)
NODES = st.fixed_dictionaries(
    {
        "class_type": ODD_TEXT | st.sampled_from(["KSampler", "SaveImage"]),
        "inputs": st.dictionaries(ODD_TEXT, JSON_VALUES, max_size=4),
    }
)
WORKFLOWS = (
    st.dictionaries(ODD_TEXT, NODES | JSON_VALUES, max_size=6)
    | st.builds(
        lambda node, key, value: {
            **TXT2IMG,
            node: {**TXT2IMG[node], "inputs": {**TXT2IMG[node]["inputs"], key: value}},
        },
        st.sampled_from(sorted(TXT2IMG)),
        ODD_TEXT,
        JSON_VALUES,
    )
    | st.just(TXT2IMG)
    | JSON_VALUES
)
DEEP = st.integers(min_value=1, max_value=5000).map(lambda n: "[" * n + "1" + "]" * n)


def _encode(value: Any, how: str) -> bytes:
    if how == "ascii":  # lone surrogates become \\udXXX escapes; NaN/Infinity literals
        return json.dumps(value).encode()
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")  # invalid UTF-8 for surrogates


TASK_BODIES = st.builds(
    lambda wf, size, cid, extra, how: _encode({"clientId": cid, "workflow": wf, "size": size, **extra}, how),
    WORKFLOWS,
    st.integers(-5, 100) | JSON_VALUES,
    st.sampled_from(["c1", "c2"]) | ODD_TEXT,
    st.dictionaries(ODD_TEXT, JSON_VALUES, max_size=2),
    st.sampled_from(["ascii", "raw"]),
)
BODIES = (
    TASK_BODIES | DEEP.map(lambda d: ('{"clientId": "c1", "workflow": ' + d + "}").encode()) | st.binary(max_size=300)
)
GRANTS = st.builds(
    lambda amount, neg: json.dumps({"userId": "fuzz-rich", "amount": amount, "allowNegative": neg}).encode(),
    st.integers() | st.integers(min_value=2**53 - 2, max_value=2**64) | st.floats(),
    st.booleans() | SCALARS,
)


@dataclass(frozen=True)
class HttpCase:
    method: str
    path: str
    body: bytes


HTTP_CASES = st.one_of(
    st.builds(HttpCase, st.just("POST"), st.just("/api/tasks"), BODIES),
    st.builds(HttpCase, st.just("POST"), st.just("/api/admin/credits"), GRANTS | BODIES),
    st.builds(
        HttpCase,
        st.sampled_from(["GET", "DELETE"]),
        ODD_TEXT.map(lambda t: "/api/tasks/" + t.encode("utf-8", "surrogatepass").hex()[:64]),
        st.just(b""),
    ),
)
STOMP_COMMANDS = st.sampled_from(
    ["SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK", "BEGIN", "CONNECT", "STOMP", "DISCONNECT", "send", "FOO", ""]
)
HEADER_TEXT = st.text(st.characters(codec=None, categories=None, exclude_characters="\n\r:\x00"), max_size=20)


def _frame(cmd: str, dest: str, headers: dict[str, str], body: bytes, last_seq: str | None) -> bytes:
    head = {"destination": dest, **({"last-seq": last_seq} if last_seq is not None else {}), **headers}
    text = cmd + "\n" + "".join(f"{k}:{v}\n" for k, v in head.items()) + "\n"
    return text.encode("utf-8", "surrogatepass") + body + b"\x00"


LAST_SEQ = st.none() | st.sampled_from(["0", "-1", "99999999999999999999", "x"])
STOMP_FRAMES = st.one_of(
    st.builds(_frame, st.just("SEND"), st.just("/app/tasks"), st.just({}), BODIES, st.none()),  # the task door
    st.builds(
        _frame, st.just("SUBSCRIBE"), st.just("/user/topic/messages"), st.just({"id": "s"}), st.just(b""), LAST_SEQ
    ),
    st.builds(
        _frame,
        STOMP_COMMANDS,
        st.sampled_from(["/app/tasks", "/app/cancel", "/user/topic/messages", "/topic/messages", "/x"]) | HEADER_TEXT,
        st.dictionaries(HEADER_TEXT, HEADER_TEXT, max_size=3),
        BODIES,
        LAST_SEQ,
    ),
)


# ---- harness ------------------------------------------------------------------------------------------------


@dataclass
class Stats:
    http: int = 0
    stomp: int = 0
    socket: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    stomp_outcomes: dict[str, int] = field(default_factory=dict)


class Surface:
    def __init__(self, handles: Handles, app: Any, auth: Authenticator, url: str, socket_every: int) -> None:
        self.h, self.app, self.auth, self.url, self.socket_every = handles, app, auth, url, socket_every
        self.client = app.test_client()
        self.stats = Stats()
        self.headers = {"Authorization": f"Bearer {auth.issue('fuzz')}", "content-type": "application/json"}
        self.admin = {"Authorization": f"Bearer {auth.issue('root', admin=True)}", "content-type": "application/json"}
        self.http = httpx.AsyncClient(timeout=30)

    async def http_case(self, case: HttpCase) -> None:
        headers = self.admin if case.path.startswith("/api/admin") else self.headers
        self.stats.http += 1
        if self.stats.http % self.socket_every == 0:
            self.stats.socket += 1
            r = await self.http.request(case.method, self.url + case.path, content=case.body, headers=headers)
            status, body = r.status_code, r.content
        else:
            resp = await self.client.open(case.path, method=case.method, data=case.body, headers=headers)
            status, body = resp.status_code, await resp.get_data()
        self.stats.statuses[status] = self.stats.statuses.get(status, 0) + 1
        assert status in HTTP_OK, (status, case, body[:300])
        if status >= 400:
            err = json.loads(body)
            assert isinstance(err.get("error"), str) and isinstance(err.get("detail"), str), body[:300]

    async def stomp_case(self, frame: bytes) -> None:
        """CONNECT, the fuzzed frame, then a probe SEND with a receipt: the probe's RECEIPT, or an ERROR frame."""
        self.stats.stomp += 1
        connect = (
            f"CONNECT\naccept-version:1.2\nheart-beat:0,0\nAuthorization:Bearer {self.auth.issue('fuzz')}\n"
            "clientId:c1\n\n\x00"
        )
        probe = 'SEND\ndestination:/app/cancel\nreceipt:probe\n\n{"taskId": "none"}\x00'
        async with self.client.websocket("/ws", subprotocols=["v12.stomp"]) as ws:
            await ws.send(connect)
            await ws.send(frame.decode("utf-8", "replace") if self.stats.stomp % 2 else frame)
            await ws.send(probe)
            seen = ""
            with trio.fail_after(10):
                while True:
                    try:
                        data = await ws.receive()
                    except Exception as exc:  # the endpoint closed the socket: it must have said why first
                        closed = exc
                    else:
                        closed = None
                    if closed is not None:
                        if frame.startswith(b"DISCONNECT\n"):
                            outcome = "disconnect"
                            break
                        assert "\nmessage:" in seen, (frame[:200], seen[:300], closed)
                        outcome = "error"
                        break
                    seen += data if isinstance(data, str) else data.decode("utf-8", "replace")
                    assert "message:internal error" not in seen, (frame[:200], seen[:500])
                    if "receipt-id:probe" in seen:
                        outcome = "receipt"
                        break
                    if "ERROR\n" in seen and "\x00" in seen.split("ERROR\n", 1)[1]:
                        outcome = "error"
                        break
        self.stats.stomp_outcomes[outcome] = self.stats.stomp_outcomes.get(outcome, 0) + 1

    async def check_end(self) -> list[str]:
        problems = await ledger.audit(self.h.ledger)
        r = await self.http.get(self.url + "/healthz")
        if r.status_code != 200:
            problems.append(f"/healthz answered {r.status_code}")
        return problems


@asynccontextmanager
async def surface(data_dir: str, comfy_url: str, *, socket_every: int = 50) -> AsyncIterator[Surface]:
    """The gateway (actors + app) in this process, served on 127.0.0.1:0 too; yields the harness."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    from web import _ws_close
    from web.server import set_permessage_deflate

    gw = GatewayConfig(
        comfyui_urls=(comfy_url,),
        store_path=f"{data_dir}/gateway.db",
        initial_credits=1000,
        submit_rate=1000.0,
        submit_burst=1000,
    )
    web = WebConfig(bind="127.0.0.1:0")
    auth = Authenticator(b"fuzz-secret-0123456789-abcdefghijklmnop")
    shutdown = trio.Event()
    set_permessage_deflate(False)
    _ws_close.install()
    async with trio.open_nursery() as nursery:
        handles = await nursery.start(run_gateway, gw)
        app = create_app(handles, web, auth, shutdown)
        hc = Config()
        hc.bind = ["127.0.0.1:0"]
        hc.accesslog = None
        hc.errorlog = None
        binds = await nursery.start(
            lambda task_status: serve(app, hc, shutdown_trigger=shutdown.wait, task_status=task_status)
        )
        s = Surface(handles, app, auth, binds[0], socket_every)
        try:
            yield s
        finally:
            await s.http.aclose()
            shutdown.set()
            nursery.cancel_scope.cancel()


# ---- a fast generator for long runs (hypothesis spends ~10 ms drawing one of the inputs above) ------------------

_ODD_CHARS = [
    "\ud800",
    "\udfff",
    "\ud83d",
    "\x00",
    "\u202e",
    "\ufeff",
    "😀",
    "é",
    "\\",
    '"',
    "\n",
    "a",
    "Ω",
    "\U0010ffff",
]


def _odd_text(rng: random.Random) -> str:
    return "".join(
        rng.choice(_ODD_CHARS) if rng.random() < 0.5 else chr(rng.randrange(0x20, 0x3000))
        for _ in range(rng.randrange(0, 12))
    )


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 2**53 + 1, 2**63, -(2**70), rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.5, float("nan"), float("inf"), -1e308, 1e-300])
    if kind in (4, 5):
        return _odd_text(rng)
    if kind == 6:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {_odd_text(rng): _value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _workflow(rng: random.Random) -> Any:
    pick = rng.randrange(5)
    if pick == 0:
        return TXT2IMG
    if pick in (1, 2):  # the real workflow with one input (or key) replaced by something odd
        node = rng.choice(sorted(TXT2IMG))
        inputs = dict(TXT2IMG[node]["inputs"])
        inputs[rng.choice(sorted(inputs)) if rng.random() < 0.5 else _odd_text(rng)] = _value(rng)
        return {**TXT2IMG, node: {**TXT2IMG[node], "inputs": inputs}}
    if pick == 3:
        return {
            _odd_text(rng): {"class_type": _odd_text(rng), "inputs": {_odd_text(rng): _value(rng)}}
            for _ in range(rng.randrange(1, 5))
        }
    return _value(rng)


def fast_body(rng: random.Random) -> bytes:
    pick = rng.randrange(10)
    if pick == 0:
        n = rng.choice([40, 1000, 5000, 20000])
        return ('{"clientId": "c1", "workflow": ' + "[" * n + "]" * n + "}").encode()
    if pick == 1:
        return rng.randbytes(rng.randrange(0, 200))
    body = {
        "clientId": rng.choice(["c1", "c2", _odd_text(rng)]),
        "workflow": _workflow(rng),
        "size": rng.choice([1, 1, 2, 0, -1, 65, "1", None, 1.5]),
    }
    if rng.random() < 0.2:
        body[_odd_text(rng)] = _value(rng)
    if rng.random() < 0.5:
        return json.dumps(body).encode()
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")


def fast_http_case(rng: random.Random) -> HttpCase:
    pick = rng.randrange(10)
    if pick < 7:
        return HttpCase("POST", "/api/tasks", fast_body(rng))
    if pick < 9:
        amount = rng.choice([1, -1, -(10**6), 2**53, 2**53 + 1, 2**63, 10**30, 0.5, "5", None])
        body = {
            "userId": rng.choice(["fuzz-rich", "fuzz", _odd_text(rng)]),
            "amount": amount,
            "allowNegative": rng.choice([True, False, "yes", None]),
        }
        return HttpCase(
            "POST",
            "/api/admin/credits",
            json.dumps(body).encode("utf-8", "surrogatepass") if rng.random() < 0.9 else fast_body(rng),
        )
    return HttpCase(rng.choice(["GET", "DELETE"]), "/api/tasks/" + rng.randbytes(8).hex(), b"")


def fast_stomp_frame(rng: random.Random) -> bytes:
    pick = rng.randrange(4)
    if pick < 2:
        return _frame("SEND", "/app/tasks", {}, fast_body(rng), None)
    if pick == 2:
        return _frame("SUBSCRIBE", "/user/topic/messages", {"id": "s"}, b"", rng.choice([None, "0", "-1", "x"]))
    cmd = rng.choice(["SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "BEGIN", "CONNECT", "DISCONNECT", "FOO", ""])
    dest = rng.choice(["/app/tasks", "/app/cancel", "/topic/messages", "/x", _odd_text(rng).replace("\n", "")])
    headers = {
        _odd_text(rng).translate(_NO_HEADER_BREAKS): _odd_text(rng).translate(_NO_HEADER_BREAKS)
        for _ in range(rng.randrange(3))
    }
    return _frame(cmd, dest.translate(_NO_HEADER_BREAKS), headers, fast_body(rng), None)


_NO_HEADER_BREAKS = str.maketrans({"\n": " ", "\r": " ", ":": " ", "\x00": " "})
