"""``web._idle.IdleReader``: idle connections' sockets read by one task, in batches.

Driven with real socket pairs and fake taps (``take`` says which chunks are heart-beats): what a parked reader is
handed, and that it always hears of the end of its socket, whichever way it ends.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from web._idle import IdleReader


class FakeTap:
    """What the reader needs of a ``HeartbeatTap``: its socket, and ``take`` (here: a chunk that is b"hb")."""

    def __init__(self, raw: socket.socket) -> None:
        self.raw = raw
        self.taken = 0

    def take(self, data: bytes) -> bool:
        if data == b"hb":
            self.taken += 1
            return True
        return False


@asynccontextmanager
async def running(interval: float = 0.001) -> AsyncIterator[tuple[IdleReader, trio.Nursery]]:
    reader = IdleReader(interval)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader.run)
        yield reader, nursery
        nursery.cancel_scope.cancel()


def pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    return ours, theirs


async def until(predicate: object, timeout: float = 5) -> None:
    with trio.fail_after(timeout):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(0.001)


async def test_heart_beats_are_taken_while_parked_and_the_first_other_chunk_wakes_the_reader() -> None:
    ours, theirs = pair()
    tap = FakeTap(ours)
    got: list[bytes] = []
    async with running() as (reader, nursery):

        async def park() -> None:
            got.append(await reader.wait(tap))  # type: ignore[arg-type]

        nursery.start_soon(park)
        await until(lambda: len(reader) == 1)
        for i in range(5):
            theirs.send(b"hb")
            await until(lambda: tap.taken == i + 1)  # noqa: B023
        assert len(reader) == 1 and got == []  # still parked: nothing for Hypercorn
        theirs.send(b"SEND frame")
        await until(lambda: got == [b"SEND frame"])
        assert len(reader) == 0  # the socket left the set with its reader
        theirs.send(b"more")  # not read by the idle reader: nobody is parked on it
        await trio.testing.wait_all_tasks_blocked()
        assert ours.recv(100) == b"more"
    ours.close()
    theirs.close()


async def test_the_end_of_the_stream_and_a_reset_reach_the_parked_reader() -> None:
    async with running() as (reader, _nursery):
        ours, theirs = pair()
        theirs.close()
        assert await reader.wait(FakeTap(ours)) == b""  # type: ignore[arg-type]  # EOF, as recv gives it
        ours.close()

        listener = socket.create_server(("127.0.0.1", 0))
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
        listener.close()
        ours.setblocking(False)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        theirs.close()  # an abortive close: the peer resets the connection
        with pytest.raises(trio.BrokenResourceError):
            await reader.wait(FakeTap(ours))  # type: ignore[arg-type]
        assert len(reader) == 0
        ours.close()


async def test_release_and_cancellation_unpark_the_reader() -> None:
    ours, theirs = pair()
    tap = FakeTap(ours)
    async with running() as (reader, nursery):
        outcome: list[str] = []

        async def park() -> None:
            try:
                await reader.wait(tap)  # type: ignore[arg-type]
            except trio.ClosedResourceError:
                outcome.append("closed")

        nursery.start_soon(park)
        await until(lambda: len(reader) == 1)
        reader.release(tap)  # type: ignore[arg-type]  # HeartbeatTap.aclose does this before closing the socket
        await until(lambda: outcome == ["closed"])
        assert len(reader) == 0

        with trio.move_on_after(0.05) as scope:
            await reader.wait(tap)  # type: ignore[arg-type]
        assert scope.cancelled_caught and len(reader) == 0  # Hypercorn's cancel leaves nothing behind
        theirs.send(b"x")
        await trio.testing.wait_all_tasks_blocked()
        assert ours.recv(10) == b"x"
    ours.close()
    theirs.close()


async def test_a_stopped_reader_ends_every_parked_wait() -> None:
    ours, theirs = pair()
    ends: list[str] = []
    async with trio.open_nursery() as outer:
        reader = IdleReader(0.001)
        async with trio.open_nursery() as inner:
            inner.start_soon(reader.run)

            async def park() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await reader.wait(FakeTap(ours))  # type: ignore[arg-type]
                ends.append("closed")

            outer.start_soon(park)
            await until(lambda: len(reader) == 1)
            inner.cancel_scope.cancel()
        await until(lambda: ends == ["closed"])
    ours.close()
    theirs.close()
