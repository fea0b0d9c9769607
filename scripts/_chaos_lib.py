"""Pieces of the fault harness (scripts/chaos.py, tests/test_restart.py, tests/test_chaos.py).

* ``GatewayProcess``: ``comfy-gateway serve`` as a subprocess on a fixed port and data directory, so it can be
  killed with SIGKILL and started again where it was (clients reconnect to the same URL; ``GATEWAY_SECRET`` keeps
  their tokens valid). Its output goes to a log file; "started" means it printed ``comfy-gateway serving on``.
* ``SimHandle``: the ComfyUI simulator on a fixed port, killed and restarted in this process, either keeping its
  history (the same ``FakeComfyUI`` object: a restart that kept its disk) or forgetting everything (a new one).
* ``ResumingClient`` (``_chaos_client.py``, re-exported here): one STOMP session (user, clientId) that reconnects
  by itself and resumes with ``last-seq``, recording every message, every resync and what it reloaded after one.

Everything is on 127.0.0.1. Waits are on events, process output or messages, each under a deadline.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from _chaos_client import ResumingClient, Seen
from fake_comfyui import FakeComfyUI

__all__ = ["GatewayProcess", "GatewayExited", "ResumingClient", "Seen", "SimHandle", "free_port", "make_workflow",
           "TERMINAL_STATES", "TERMINAL_TYPES"]

log = logging.getLogger("chaos")

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).with_name("comfy-gateway")
SERVING = b"comfy-gateway serving on "
TERMINAL_TYPES = ("completed", "execution_error", "cancelled")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
CHAOS_SECRET = "chaos-secret-0123456789-abcdefghijklmnopqrstuv"


def free_port() -> int:
    """A port that was free a moment ago (bound once, then reused across restarts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- workflows -------------------------------------------------------------------------------------------------

_TXT2IMG: dict[str, Any] = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dawn", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "3": {"class_type": "KSampler", "inputs": {
        "seed": 1, "steps": 4, "cfg": 8.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "chaos", "images": ["8", 0]}},
}


def make_workflow(kind: str = "ok", *, steps: int = 4, seed: int = 1) -> dict[str, Any]:
    """``ok``: a small txt2img; ``fail``: the same, failing in its sampler; ``invalid``: refused by ComfyUI (400)."""
    wf = copy.deepcopy(_TXT2IMG)
    wf["3"]["inputs"]["steps"] = steps
    wf["3"]["inputs"]["seed"] = seed
    if kind == "fail":
        wf["3"]["inputs"]["sim_error"] = "chaos: scripted failure"
    elif kind == "invalid":
        wf["9"]["class_type"] = "NoSuchNode"
    elif kind != "ok":
        raise ValueError(kind)
    return wf


# ---- the gateway as a process -----------------------------------------------------------------------------------


class GatewayExited(Exception):
    """The gateway process ended without being asked to."""


class GatewayProcess:
    """``comfy-gateway serve`` on ``127.0.0.1:port`` with ``--data data`` (and ``--store`` when given: a
    ``redis://`` URL, or an SQLite path); killable, restartable."""

    def __init__(self, *, data: Path, comfy_urls: list[str], port: int | None = None, args: tuple[str, ...] = (),
                 log_path: Path | None = None, secret: str = CHAOS_SECRET, store: str | None = None) -> None:
        self.data = data
        self.store = store
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        self.comfy_urls = comfy_urls
        self.args = args
        self.secret = secret
        self.log_path = log_path or data.parent / "gateway.log"
        self.proc: trio.Process | None = None
        self.is_up = False  # a started process is serving
        self._up = trio.Event()  # set when it comes up; replaced (only once set) when it goes
        self.starts = 0
        self.kills = 0
        self.error_lines: list[str] = []
        self.lines: list[bytes] = []  # output of the current process
        self._output = trio.Event()
        self._expected_exit = False
        self._exited: trio.Event | None = None

    @property
    def store_spec(self) -> str:
        """What ``open_store`` takes to read this gateway's store from outside (audits)."""
        return self.store or str(self.data / "gateway.db")

    def issue(self, user: str, *, admin: bool = False) -> str:
        from web.auth import Authenticator

        return Authenticator(self.secret.encode()).issue(user, ttl=24 * 3600, admin=admin)

    def headers(self, user: str, *, admin: bool = False) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.issue(user, admin=admin)}"}

    async def start(self, nursery: trio.Nursery, *, timeout: float = 30) -> None:
        """Start the process and return once it printed that it serves (its output keeps going to the log)."""
        assert self.proc is None or self.proc.returncode is not None, "already running"
        cmd = [str(EXE), "serve", "--bind", f"127.0.0.1:{self.port}", "--data", str(self.data)]
        for url in self.comfy_urls:
            cmd += ["--comfyui", url]
        if self.store:
            cmd += ["--store", self.store if "://" in self.store else f"sqlite:{self.store}"]
        cmd += list(self.args)
        env = {**os.environ, "GATEWAY_SECRET": self.secret, "PYTHONUNBUFFERED": "1"}
        self.data.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        self._expected_exit = False
        self._exited = trio.Event()
        self.lines = []
        self.proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        serving = trio.Event()
        nursery.start_soon(self._pump, self.proc, serving, self._exited, self.starts)
        with trio.fail_after(timeout):
            await serving.wait()
        if self.proc.returncode is not None:
            raise GatewayExited(f"gateway exited with {self.proc.returncode} while starting; see {self.log_path}")
        self._set_up(True)

    async def _pump(self, proc: trio.Process, serving: trio.Event, exited: trio.Event, generation: int) -> None:
        """Copy the process's output to the log, watch it, and own the process: if the harness is torn down
        (cancelled, or a check failed) while it still runs, it is killed, never left behind."""
        try:
            await self._copy_output(proc, serving, exited, generation)
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.move_on_after(5, shield=True):
                    await proc.wait()

    async def _copy_output(self, proc: trio.Process, serving: trio.Event, exited: trio.Event, generation: int) -> None:
        buf = b""
        assert proc.stdout is not None
        with open(self.log_path, "ab") as out:
            out.write(f"---- gateway start #{generation} ----\n".encode())
            while True:
                try:
                    chunk = await proc.stdout.receive_some(65536)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    chunk = b""
                if not chunk:
                    break
                out.write(chunk)
                buf += chunk
                *lines, buf = buf.split(b"\n")
                if self.proc is proc:
                    self.lines.extend(lines)
                    self._output.set()
                    self._output = trio.Event()
                for line in lines:
                    if SERVING in line:
                        serving.set()
                    elif b" ERROR " in line or line.startswith(b"Traceback"):
                        self.error_lines.append(line.decode(errors="replace"))
            await proc.wait()
            out.write(f"---- gateway #{generation} exited with {proc.returncode} ----\n".encode())
        starting = not serving.is_set()
        serving.set()  # unblock a start() that waits: it checks returncode and raises
        exited.set()
        if self.proc is proc:
            self._set_up(False)
            if not self._expected_exit and not starting:
                raise GatewayExited(f"gateway #{generation} exited by itself with {proc.returncode}; "
                                    f"see {self.log_path}")

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs, nothing is flushed but what SQLite already committed."""
        await self._end(signal.SIGKILL)
        self.kills += 1

    async def stop(self, *, timeout: float = 20) -> int:
        """SIGTERM and wait for a clean exit; returns the exit code."""
        return await self._end(signal.SIGTERM, timeout=timeout)

    async def _end(self, sig: int, *, timeout: float = 20) -> int:
        assert self.proc is not None and self._exited is not None
        self._expected_exit = True
        self._set_up(False)
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        with trio.fail_after(timeout):
            await self._exited.wait()
        return int(self.proc.returncode or 0)

    def _set_up(self, up: bool) -> None:
        self.is_up = up
        if up:
            self._up.set()
        elif self._up.is_set():  # never replace an event someone waits on before it was set
            self._up = trio.Event()

    async def wait_up(self) -> None:
        while not self.is_up:
            await self._up.wait()

    async def wait_output(self, needle: str, *, timeout: float = 30) -> str:
        """The first line of the current process's output containing ``needle`` (already printed or to come)."""
        want = needle.encode()
        checked = 0
        with trio.fail_after(timeout):
            while True:
                for line in self.lines[checked:]:
                    if want in line:
                        return line.decode(errors="replace")
                checked = len(self.lines)
                await self._output.wait()


# ---- the simulator, killable --------------------------------------------------------------------------------------


class SimHandle:
    """The ComfyUI simulator on one port for the whole run. ``kill`` drops every socket and its queue;
    ``start(forget=False)`` brings the same process state back (history, files), ``forget=True`` a new one."""

    def __init__(self, nursery: trio.Nursery, **sim_kw: Any) -> None:
        self.nursery = nursery
        self.sim_kw = sim_kw
        self.port = 0
        self.sims: list[FakeComfyUI] = []
        self._scope: trio.CancelScope | None = None
        self._done: trio.Event | None = None
        self.kills = 0
        self.forgets = 0

    @property
    def sim(self) -> FakeComfyUI:
        return self.sims[-1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, *, forget: bool = False) -> None:
        if not self.sims or forget:
            self.sims.append(FakeComfyUI(**self.sim_kw))
            self.forgets += len(self.sims) > 1
        scope, done = trio.CancelScope(), trio.Event()
        sim = self.sim

        async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await sim.serve(port=self.port, task_status=task_status)
            finally:
                done.set()

        self.port = await self.nursery.start(run)
        self._scope, self._done = scope, done

    async def kill(self) -> None:
        assert self._scope is not None and self._done is not None
        self._scope.cancel()
        with trio.fail_after(10):
            await self._done.wait()
        self.kills += 1

    def runs_by_prompt(self) -> dict[str, list[str]]:
        """prompt_id -> outcomes of every run of it, across every simulator object of this run."""
        out: dict[str, list[str]] = {}
        for sim in self.sims:
            for r in sim.runs:
                out.setdefault(r.prompt_id, []).append(r.outcome)
        return out
