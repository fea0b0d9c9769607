"""``actors._util.ask``: request/response over memory channels, with the reply typed by the message's ``reply``
field. ``scripts/lint`` runs mypy on this file, so the ``assert_type`` lines are checked statically too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import assert_type

import pytest
import trio
import trio.testing

from actors._util import ActorGone, NoAnswer, ask, ask_within, reply_once


@dataclass(frozen=True, slots=True)
class Double:
    value: int
    reply: trio.MemorySendChannel[int]


@dataclass(frozen=True, slots=True)
class Name:
    reply: trio.MemorySendChannel[str | None] | None = None  # an optional reply fits too


Msg = Double | Name


async def serve(inbox: trio.MemoryReceiveChannel[Msg]) -> None:
    async for msg in inbox:
        match msg:
            case Double(value, reply):
                reply_once(reply, 2 * value)
            case Name(reply) if reply is not None:
                reply_once(reply, "doubler")


async def test_the_answer_comes_back_typed_by_the_reply_field(nursery: trio.Nursery) -> None:
    send, receive = trio.open_memory_channel[Msg](4)
    nursery.start_soon(serve, receive)
    doubled = await ask(send, lambda r: Double(21, r))
    assert_type(doubled, int)
    name = await ask(send, Name)
    assert_type(name, str | None)
    assert (doubled, name) == (42, "doubler")


async def test_a_stopped_actor_is_actor_gone() -> None:
    send, receive = trio.open_memory_channel[Msg](4)
    receive.close()
    with pytest.raises(ActorGone, match="actor 'doubler' is gone"):
        await ask(send, lambda r: Double(1, r), name="doubler")


async def test_an_actor_that_drops_the_request_is_actor_gone() -> None:
    send, receive = trio.open_memory_channel[Msg](4)

    async def drop_one() -> None:
        msg = await receive.receive()
        assert isinstance(msg, Double)
        msg.reply.close()  # e.g. the actor crashed while handling it

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drop_one)
        with pytest.raises(ActorGone):
            await ask(send, lambda r: Double(1, r))


async def test_ask_within_answers_or_says_why_not(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    send, receive = trio.open_memory_channel[Msg](4)
    nursery.start_soon(serve, receive)
    assert_type(await ask_within(send, lambda r: Double(4, r), 1.0, name="doubler"), int)
    assert await ask_within(send, lambda r: Double(4, r), 1.0, name="doubler") == 8

    silent_send, silent_receive = trio.open_memory_channel[Msg](4)  # an actor that never answers
    start = trio.current_time()
    with pytest.raises(NoAnswer, match="did not answer in time") as slow:
        await ask_within(silent_send, lambda r: Double(1, r), 2.5, name="silent")
    assert not slow.value.gone and trio.current_time() - start == 2.5

    silent_receive.close()  # the actor has stopped
    with pytest.raises(NoAnswer, match="is gone") as gone:
        await ask_within(silent_send, lambda r: Double(1, r), 2.5, name="silent")
    assert gone.value.gone and gone.value.name == "silent"
