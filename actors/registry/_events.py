"""ComfyUI's events, one at a time (``Registry.on_event`` relays progress itself and hands the rest here)."""

from __future__ import annotations

from typing import Any

from ..comfy import (
    Executed,
    Executing,
    ExecutionError,
    ExecutionInterrupted,
    ExecutionStart,
    ExecutionSuccess,
    PreviewImage,
    Progress,
    Status,
)
from ..task_machine import Reason, State, TimerKind
from ._api import RECHECK_DELAY
from ._timers import Timers

__all__ = ["Events"]


class Events(Timers):
    async def on_event_general(self, backend: str, event: Any) -> None:
        """Any event (``on_event`` takes a short cut for progress; tests/test_registry.py checks it is the same)."""
        if (seen := self.task_for_prompt(getattr(event, "prompt_id", None))) is not None:
            seen.seen = True
        match event:
            case ExecutionStart(prompt_id=pid):
                if (task := self.task_for_prompt(pid)) is not None:
                    await self.mark_running(task, backend)
            case Progress(prompt_id=pid, node=node, value=value, max=mx):
                if (task := self.task_for_prompt(pid)) is not None:
                    await self.relay_progress(task, backend, value, mx, node)
            case PreviewImage(prompt_id=pid, mime=mime, image=image):
                if (task := self.task_for_prompt(pid)) is not None:
                    await self.relay_preview(task, mime, image)
            case Executed(prompt_id=pid, output=output):
                if (task := self.task_for_prompt(pid)) is not None and output:
                    await self.mark_running(task, backend)
                    await self.add_images(task, list(output.get("images") or ()), backend)
            case ExecutionSuccess(prompt_id=pid):
                if (task := self.task_for_prompt(pid)) is not None:
                    await self.mark_submitted(task, backend)  # it ran there, whatever else was missed
                    if task.gap:  # an `executed` may have been missed: read the outputs from /history first
                        task.awaiting_history = True
                        self.after(RECHECK_DELAY, TimerKind.CHECK, task.id)  # if the idle `executing` is missed too
                    else:
                        await self.finish(task, State.SUCCEEDED, None)
            case Executing(prompt_id=pid, node=None):  # the prompt is done and its history entry written
                if (task := self.task_for_prompt(pid)) is not None and task.awaiting_history:
                    await self.check(backend, (task.rec.prompt_id,))
            case Status(queue_remaining=remaining):
                await self.cross_check(backend, remaining)
            case ExecutionError(prompt_id=pid, blocked=False) as err:
                if (task := self.task_for_prompt(pid)) is not None:
                    await self.finish(
                        task,
                        State.FAILED,
                        Reason.EXECUTION_ERROR,
                        {
                            "error": f"{err.node_type or 'node'} {err.node_id or ''}: {err.exception_message}".strip(),
                            "node_id": err.node_id,
                            "node_type": err.node_type,
                            "exception_type": err.exception_type,
                        },
                    )
            case ExecutionInterrupted(prompt_id=pid, node_id=node_id, node_type=node_type):
                if (task := self.task_for_prompt(pid)) is not None:
                    await self.interrupted(task, node_id, node_type)
            case _:
                pass  # executing, cached, progress_state: nothing a user needs from the registry
