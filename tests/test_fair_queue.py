"""The scheduler's round-robin queue: a task's position, computed without building the whole dispatch order, is
its place in that order, and its length (kept without walking the users' queues) is that order's, whatever was
pushed, dispatched and withdrawn before."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from actors.scheduler import Job, _FairQueue

USERS = ("ann", "bob", "cid", "dee")
# ("push", user) | ("pop", _) | ("remove", k): the k-th task pushed so far
steps = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.sampled_from(USERS)),
        st.tuples(st.just("pop"), st.just("")),
        st.tuples(st.just("remove"), st.integers(0, 40)),
    ),
    max_size=60,
)


@given(steps)
def test_position_is_the_place_in_dispatch_order(plan: list[tuple[str, object]]) -> None:
    queue = _FairQueue()
    pushed: list[Job] = []
    for op, arg in plan:
        if op == "push":
            job = Job(f"t{len(pushed)}", str(arg), f"p{len(pushed)}", {})
            pushed.append(job)
            queue.push(job)
            assert queue.position(job.task_id) == queue.order().index(job.task_id) + 1
        elif op == "pop":
            queue.pop_next(lambda user: True)
        elif isinstance(arg, int) and arg < len(pushed):
            queue.remove(pushed[arg].task_id)
        order = queue.order()
        assert len(queue) == len(order) and bool(queue) == bool(order)  # len is the owner map's: every job once
        asked = [job.task_id for job in pushed] + ["never-pushed"]
        assert queue.positions(asked) == {t: queue.position(t) for t in asked}  # one walk for all, the same places
        for job in pushed:
            want = order.index(job.task_id) + 1 if job.task_id in order else None
            assert queue.position(job.task_id) == want


def test_round_robin_positions_by_hand() -> None:
    queue = _FairQueue()
    for task_id, user in (("a1", "ann"), ("a2", "ann"), ("a3", "ann"), ("b1", "bob"), ("c1", "cid"), ("c2", "cid")):
        queue.push(Job(task_id, user, "p-" + task_id, {}))
    # dispatch order: a1 b1 c1 a2 c2 a3
    assert [queue.position(t) for t in ("a1", "b1", "c1", "a2", "c2", "a3")] == [1, 2, 3, 4, 5, 6]
    assert queue.position("zz") is None


def test_a_task_enqueued_twice_waits_once(caplog) -> None:  # type: ignore[no-untyped-def]
    """A second Enqueue of a waiting task (a bug upstream) is logged and ignored: the task is dispatched once, and
    the scheduler goes on (it does not crash on it)."""
    queue = _FairQueue()
    first = Job("t1", "ann", "p1", {})
    queue.push(first)
    queue.push(Job("t2", "bob", "p2", {}))
    queue.push(Job("t1", "ann", "p1-again", {}))
    assert len(queue) == 2 and queue.order() == ["t1", "t2"]
    assert "t1 enqueued while it waits already" in caplog.text
    assert queue.pop_next(lambda user: True) is first
    assert queue.pop_next(lambda user: True) is not None and not queue
