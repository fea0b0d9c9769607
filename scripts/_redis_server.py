"""A private ``redis-server`` for tests and the chaos run: a free port on 127.0.0.1, its own data directory, AOF on,
no RDB.

Never the machine's shared Redis on 6379. A missing binary is an error (the Redis tests fail, never skip);
``scripts/test`` installs it when it can.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

START_TIMEOUT = 10.0  # seconds for the server to accept connections


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the process that started it dies (a killed pytest or chaos run
    leaves no orphaned redis-server behind). Linux only; elsewhere the server outlives a killed parent."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """``start()``/``stop()``/``restart()`` a redis-server subprocess; ``url(db)``; ``flush()`` empties every db."""

    def __init__(self, data_dir: Path) -> None:
        binary = shutil.which("redis-server") or (
            "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
        )
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: the Redis store tests need it (apt-get install "
                "redis-server; scripts/test installs it when it can)"
            )
        self.binary = binary
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--logfile",
                str(self.dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # called from the main thread: the signal follows the process that started it
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if self.command(b"PING") == b"+PONG":
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}") from None
                time.sleep(0.02)  # start-up poll, not a test's timing

    def command(self, *words: bytes) -> bytes:
        """One command over a plain socket; returns the first reply line."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words))
            return s.makefile("rb").readline().rstrip(b"\r\n")

    def flush(self) -> None:
        assert self.command(b"FLUSHALL") == b"+OK"

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
