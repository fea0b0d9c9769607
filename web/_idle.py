"""Idle ``/ws`` connections' sockets, read by one task in batches (issue 11: 10,000 idle connections).

An idle STOMP connection only ever receives heart-beats. With a task waiting on each socket, every heart-beat wakes
that task through trio's epoll, which alone costs more than the 3% of a core 10,000 connections with 10 s
heart-beats are allowed (measured: `scripts/bench_relay.py --paths idle`, the "trio floor" row). Here a connection
whose last chunk was a heart-beat parks its reader (Hypercorn's, inside ``HeartbeatTap.receive_some``) on an epoll
set of its own, and one task reads every parked socket that has something, at most once per ``interval``: a
heart-beat is taken right there (``HeartbeatTap.take``) and the connection stays parked, so a second of 1,000
heart-beats costs ~1/interval wake-ups instead of 1,000. Anything else (a frame, the end of the stream, an error)
is handed to the parked reader, which returns it to Hypercorn as if it had read it itself; the connection then
reads on its own again until its next heart-beat. The price: the first frame a client sends after being idle
waits up to ``interval`` (10 ms by default, ``--idle-read-interval``).

Level-triggered: a parked socket is in the set only while its reader is parked (``wait`` registers it, whatever
hands the reader a result or cancels it unregisters it), so nothing is read while Hypercorn is busy with the last
chunk, and Hypercorn's own backpressure holds.
"""

from __future__ import annotations

import errno
import logging
import select
from typing import TYPE_CHECKING

import outcome
import trio

if TYPE_CHECKING:
    from ._transport import HeartbeatTap

log = logging.getLogger(__name__)

__all__ = ["AVAILABLE", "IdleReader"]

AVAILABLE = hasattr(select, "epoll")  # Linux; elsewhere every connection's reader waits on its own socket

MAX_RECV = 65536  # what Hypercorn asks for per read
MAX_EVENTS = 4096  # sockets read per pass (the rest stay ready for the next one)
_CLOSED_ERRNOS = (errno.EBADF, errno.ENOTSOCK)


def _broken(exc: OSError) -> Exception:
    """A socket error as trio's ``SocketStream`` raises it."""
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


class IdleReader:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._ep = select.epoll()
        self._parked: dict[int, tuple[HeartbeatTap, trio.lowlevel.Task]] = {}  # fd -> the reader parked on it
        self.reads = 0  # sockets read (statistics, tests)
        self.passes = 0  # wake-ups that read at least one

    def __len__(self) -> int:
        return len(self._parked)

    async def wait(self, tap: HeartbeatTap) -> bytes:
        """Park the calling task (a connection's reader) until its socket brings something that is not a
        heart-beat ``tap`` takes: those bytes (``b""`` at the end of the stream), or trio's error for a broken
        socket. Cancellable; ``release`` ends it with ``ClosedResourceError`` when the stream is closed."""
        raw = tap.raw
        fd = raw.fileno()
        if fd == -1:
            raise trio.ClosedResourceError("this socket was already closed")
        old = self._parked.get(fd)
        if old is not None:  # a closed socket's number, reused: its reader can only be told the socket is gone
            self._unpark(fd)
            trio.lowlevel.reschedule(old[1], outcome.Error(trio.ClosedResourceError("socket closed")))
        task = trio.lowlevel.current_task()
        self._parked[fd] = (tap, task)
        self._ep.register(fd, select.EPOLLIN)

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            if self._parked.get(fd, (None, None))[1] is task:
                self._unpark(fd)
            return trio.lowlevel.Abort.SUCCEEDED

        data: bytes = await trio.lowlevel.wait_task_rescheduled(abort)
        return data

    def release(self, tap: HeartbeatTap) -> None:
        """``tap``'s stream is being closed: a reader parked on it ends with ``ClosedResourceError``."""
        fd = tap.raw.fileno()
        entry = self._parked.get(fd)
        if entry is not None and entry[0] is tap:
            self._unpark(fd)
            trio.lowlevel.reschedule(entry[1], outcome.Error(trio.ClosedResourceError("socket closed")))

    def _unpark(self, fd: int) -> None:
        del self._parked[fd]
        try:
            self._ep.unregister(fd)
        except (OSError, ValueError):  # already gone from the set (the kernel drops a closed descriptor)
            pass

    def _read(self, fd: int) -> None:
        entry = self._parked.get(fd)
        if entry is None:
            return
        tap, task = entry
        try:
            data = tap.raw.recv(MAX_RECV)
        except BlockingIOError:
            return
        except OSError as exc:
            result: outcome.Outcome[bytes] = outcome.Error(_broken(exc))
        else:
            self.reads += 1
            if tap.take(data):
                return  # a heart-beat: the connection stays parked
            result = outcome.Value(data)
        self._unpark(fd)
        trio.lowlevel.reschedule(task, result)

    async def run(self) -> None:
        """Read the parked sockets for ever: wait until one has something, read every one that has, then let
        ``interval`` pass before the next wake-up so that the heart-beats arriving meanwhile share it."""
        try:
            while True:
                await trio.lowlevel.wait_readable(self._ep)
                ready = self._ep.poll(0, MAX_EVENTS)
                if ready:
                    self.passes += 1
                for fd, _mask in ready:
                    try:
                        self._read(fd)
                    except Exception:  # a bug costs that connection its read, never every idle connection's
                        log.exception("idle reader: reading fd %d failed", fd)
                        entry = self._parked.get(fd)
                        if entry is not None:
                            self._unpark(fd)
                            trio.lowlevel.reschedule(entry[1], outcome.Error(trio.BrokenResourceError("read failed")))
                await trio.sleep(self.interval)
        finally:
            for fd, (_tap, task) in list(self._parked.items()):  # nobody reads for them any more
                self._unpark(fd)
                trio.lowlevel.reschedule(task, outcome.Error(trio.ClosedResourceError("idle reader stopped")))
            self._ep.close()
