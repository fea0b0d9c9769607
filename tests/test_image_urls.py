"""Signed image URLs: an ``<img src>`` sends no header, so the URLs the gateway hands out carry an HMAC over
(task, index, expiry). Valid works with no header; tampered or expired is 403; another user's task is 404;
header authentication keeps working; results re-sign on read."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import trio
from conftest import TEST_SECRET, GatewayUnderTest, wait_backends_up, workflow

import web.app
from actors.image_urls import ImageUrls


class FakeWallClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_sign_and_check() -> None:
    clock = FakeWallClock(1_000.0)
    urls = ImageUrls("http://gw", TEST_SECRET, ttl=60, clock=clock)
    u = urlsplit(urls.url("t1", 0))
    q = {k: v[0] for k, v in parse_qs(u.query).items()}
    assert u.path == "/api/images/t1/0" and q["exp"] == "1062"  # ttl 60 s, rounded up to a tenth of it
    clock.now = 1_001.5
    assert urls.url("t1", 0) == u.geturl()  # stable for a while: reloads and the browser's cache see one URL
    clock.now = 1_000.0
    assert urls.check("t1", 0, q["exp"], q["sig"]) == "ok"
    assert urls.check("t2", 0, q["exp"], q["sig"]) == "bad"  # moved to another task
    assert urls.check("t1", 1, q["exp"], q["sig"]) == "bad"  # another image of the task
    assert urls.check("t1", 0, "99999", q["sig"]) == "bad"  # expiry pushed back
    assert urls.check("t1", 0, q["exp"], q["sig"][:-2] + "AA") == "bad"
    assert urls.check("t1", 0, None, None) == "bad" and urls.check("t1", 0, "-5", q["sig"]) == "bad"
    assert (
        ImageUrls("http://gw", b"another-secret-0123456789", ttl=60, clock=clock).check("t1", 0, q["exp"], q["sig"])
        == "bad"
    )
    clock.now = 1_061.9
    assert urls.check("t1", 0, q["exp"], q["sig"]) == "ok"
    clock.now = 1_062.0
    assert urls.check("t1", 0, q["exp"], q["sig"]) == "expired"
    with pytest.raises(ValueError, match="ttl"):
        ImageUrls("http://gw", TEST_SECRET, ttl=0)


async def finished(g: GatewayUnderTest, user: str, task_id: str) -> dict[str, Any]:
    with trio.fail_after(20):
        while True:
            r = await g.http.get(f"{g.url}/api/tasks/{task_id}", headers=g.auth(user))
            assert r.status_code == 200, r.text
            if r.json()["state"] not in ("queued", "submitted", "running"):
                return r.json()  # type: ignore[no-any-return]
            await trio.sleep(0.05)


def with_query(url: str, **changes: str) -> str:
    u = urlsplit(url)
    q = {k: v[0] for k, v in parse_qs(u.query).items()} | changes
    return u._replace(query=urlencode(q)).geturl()


async def test_signed_urls_valid_tampered_expired_foreign(start_gateway: Any, sim: Any) -> None:
    clock = FakeWallClock(1_700_000_000.0)
    g = await start_gateway([sim.url], web={"wall_clock": clock, "image_url_ttl": 3600})
    await wait_backends_up(g)
    a = await finished(g, "alice", (await g.submit("alice", workflow("txt2img")))["taskId"])
    b = await finished(g, "bob", (await g.submit("bob", workflow("txt2img"), client_id="b1"))["taskId"])
    assert a["state"] == "succeeded" and a["urls"]
    url = a["urls"][0]
    assert urlsplit(url).path == f"/api/images/{a['taskId']}/0"
    exp = int(parse_qs(urlsplit(url).query)["exp"][0])
    assert clock.now + 3600 <= exp < clock.now + 3600 + 360 and exp % 360 == 0  # ttl, rounded up to a tenth of it

    ok = await g.http.get(url)  # no header at all, as an <img src>
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    assert ok.content.startswith(b"\x89PNG")

    sig = parse_qs(urlsplit(url).query)["sig"][0]
    for bad in (
        with_query(url, sig=sig[:-3] + "abc"),
        with_query(url, exp=str(int(clock.now) + 999_999)),
        with_query(url, sig=""),
    ):
        r = await g.http.get(bad)
        assert r.status_code == 403 and r.json()["error"] == "bad_signature", bad
    # the signature of alice's image, put on bob's task: refused, bob's image is not served
    moved = url.replace(a["taskId"], b["taskId"])
    r = await g.http.get(moved)
    assert r.status_code == 403 and r.json()["error"] == "bad_signature"

    # a request that names another user gets 404 even with a valid signature (the owner's header is fine)
    r = await g.http.get(url, headers=g.auth("bob"))
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert (await g.http.get(url, headers=g.auth("alice"))).status_code == 200
    # header authentication keeps working: the owner gets it, anyone else gets 404
    bare = url.split("?")[0]
    assert (await g.http.get(bare, headers=g.auth("alice"))).status_code == 200
    r = await g.http.get(bare, headers=g.auth("bob"))
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert (await g.http.get(bare)).status_code == 401
    # a genuine signature for an image the task does not have
    beyond = ImageUrls(g.url, TEST_SECRET, ttl=3600, clock=clock).url(a["taskId"], 99)  # the test knows the secret
    assert (await g.http.get(beyond)).status_code == 404

    clock.now = exp  # once its expiry is reached the URL has expired ...
    r = await g.http.get(url)
    assert r.status_code == 403 and r.json()["error"] == "expired"
    # ... and reading the task again hands out a freshly signed one (results too)
    again = (await g.http.get(f"{g.url}/api/tasks/{a['taskId']}", headers=g.auth("alice"))).json()["urls"][0]
    assert again != url and (await g.http.get(again)).status_code == 200
    res = (await g.http.get(f"{g.url}/api/results", headers=g.auth("alice"))).json()["results"]
    assert (await g.http.get(res[0]["urls"][0])).status_code == 200


async def test_image_over_the_size_limit_is_refused(
    start_gateway: Any, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = await start_gateway([sim.url])
    await wait_backends_up(g)
    a = await finished(g, "alice", (await g.submit("alice", workflow("txt2img")))["taskId"])
    monkeypatch.setattr(web.app, "MAX_IMAGE_BYTES", 64)
    r = await g.http.get(a["urls"][0])
    assert r.status_code == 502 and r.json()["error"] == "too_large"
