"""SockJS HTTP sessions on trio (web/sockjs/_server.py) under MockClock: heart-beats on an idle poll, the
session timeout, bounded memory for a client that stops polling, and abort. The STOMP endpoint is replaced by
a small echo endpoint: the session is only a transport to it."""

from __future__ import annotations

import trio
import trio.testing

from web.sockjs import SockJSConfig, SockJSService
from web.sockjs._server import _HttpSession


class EchoEndpoint:
    """Stands in for StompEndpoint.run: echoes each received message upper-cased; records how it ended."""

    def __init__(self, flood: int = 0) -> None:
        self.flood = flood  # >0: instead of echoing, send messages of this many bytes for ever
        self.ended = trio.Event()
        self.cancelled = False

    async def run(self, transport: _HttpSession) -> None:
        try:
            if self.flood:
                while True:
                    await transport.send("x" * self.flood)
            while True:
                await transport.send((await transport.receive()).upper())
        except trio.Cancelled:
            self.cancelled = True
            raise
        finally:
            self.ended.set()


def service(endpoint: EchoEndpoint, nursery: trio.Nursery, **cfg: float) -> SockJSService:
    return SockJSService(endpoint, SockJSConfig(**cfg), lambda origin: True, lambda: nursery)  # type: ignore[arg-type]


async def test_poll_heartbeat_echo_and_timeout(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    ep = EchoEndpoint()
    svc = service(ep, nursery, heartbeat=25.0, disconnect_delay=5.0)
    sess = svc.open_session("s1", "xhr")
    t0 = trio.current_time()
    assert await svc.poll(sess) == "o"
    assert await svc.poll(sess) == "h"  # nothing to say for a whole heart-beat period
    assert trio.current_time() - t0 == 25.0
    await sess.inbox_send.send("hello")
    assert await svc.poll(sess) == 'a["HELLO"]'
    assert trio.current_time() - t0 == 25.0  # answered at once, no waiting
    # the client stops polling: exactly disconnect_delay later its endpoint is cancelled and the session gone
    await ep.ended.wait()
    assert trio.current_time() - t0 == 30.0
    await trio.testing.wait_all_tasks_blocked()
    assert ep.cancelled and "s1" not in svc.sessions


async def test_second_receiver_is_refused(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    ep = EchoEndpoint()
    svc = service(ep, nursery, heartbeat=25.0)
    sess = svc.open_session("s5", "xhr")
    assert await svc.poll(sess) == "o"
    got: list[str] = []

    async def first_poll() -> None:
        got.append(await svc.poll(sess))

    nursery.start_soon(first_poll)
    await trio.testing.wait_all_tasks_blocked()  # the first poll is attached and waiting
    assert await svc.poll(sess) == 'c[2010,"Another connection still open"]'
    await sess.inbox_send.send("still mine")  # the first poll still gets the session's messages
    await trio.testing.wait_all_tasks_blocked()
    assert got == ['a["STILL MINE"]']


async def test_a_waiting_poll_keeps_the_session_alive(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    ep = EchoEndpoint()
    svc = service(ep, nursery, heartbeat=25.0, disconnect_delay=5.0)
    sess = svc.open_session("s2", "xhr")
    assert await svc.poll(sess) == "o"
    for _ in range(4):  # a client that keeps polling is never timed out, whatever the time
        assert await svc.poll(sess) == "h"
    assert "s2" in svc.sessions and not ep.ended.is_set()


async def test_client_that_stops_polling_holds_bounded_memory(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    ep = EchoEndpoint(flood=100_000)
    svc = service(ep, nursery, max_pending=1 << 20, disconnect_delay=5.0)
    sess = svc.open_session("s3", "xhr")
    assert await svc.poll(sess) == "o"
    await trio.testing.wait_all_tasks_blocked()
    # the endpoint is blocked in send(): at most max_pending (+ one message) is held for the absent client
    assert (1 << 20) <= sess.state.pending_bytes < (1 << 20) + 100_000
    assert not ep.ended.is_set()  # blocked, not failed: a poll now would get it all
    await ep.ended.wait()  # and the session goes away after disconnect_delay, freeing it all
    await trio.testing.wait_all_tasks_blocked()
    assert "s3" not in svc.sessions


async def test_abort_closes_the_session_for_its_next_poll(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    ep = EchoEndpoint()
    svc = service(ep, nursery, disconnect_delay=5.0)
    sess = svc.open_session("s4", "xhr")
    assert await svc.poll(sess) == "o"
    assert sess.abort is not None
    await sess.abort()  # what the STOMP endpoint's watchdog does to a writer stuck on a slow client
    await ep.ended.wait()
    assert ep.cancelled
    assert await svc.poll(sess) == 'c[1008,"slow consumer"]'
    assert await svc.poll(sess) == 'c[1008,"slow consumer"]'
