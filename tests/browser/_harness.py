"""Runs browser scenarios: a Node script driving Debian's Chromium with playwright-core (tests/node) against a
live gateway on a free port. Missing Node, playwright-core, Chromium or the page's vendored stompjs is a test
failure saying how to get it (``scripts/test`` installs them all), never a skip.

A scenario script prints one JSON line: its result, or ``{"error"}`` with a non-zero exit. Screenshots go to
``test-artifacts/browser/`` (gitignored), also on failure.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
NODE_DIR = ROOT / "tests" / "node"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
VENDOR = ROOT / "web" / "static" / "vendor" / "stomp.umd.min.js"
SCENARIO_TIMEOUT = 90  # seconds for one scenario script, Chromium start included


def browser_tools(packages: tuple[str, ...] = ("playwright-core",), page: bool = True) -> str:
    """The ``node`` executable once every piece a browser test needs is there (Chromium, the tests/node
    ``packages``, and for ``page`` the page's vendored stompjs); otherwise the test fails."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "`node` is not on PATH: the browser tests need Node.js >= 18 (then run scripts/test).", pytrace=False
        )
    missing = [p for p in packages if not (NODE_DIR / "node_modules" / p / "package.json").is_file()]
    if missing:
        pytest.fail(
            f"tests/node/node_modules lacks {', '.join(missing)}: run scripts/test (it runs `npm ci` in tests/node).",
            pytrace=False,
        )
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Debian's chromium (`apt-get install chromium`; "
            "scripts/test does it).",
            pytrace=False,
        )
    if page and not VENDOR.is_file():
        pytest.fail(
            f"{VENDOR.relative_to(ROOT)} is missing: scripts/test (or scripts/run) copies it from npm.", pytrace=False
        )
    return node


async def run_scenario(script: str, scenario: str, url: str, **args: Any) -> dict[str, Any]:
    """Run ``tests/browser/<script>`` for ``scenario`` against the gateway at ``url``; return its result."""
    node = browser_tools()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    cmd = [node, str(HERE / script), "--scenario", scenario, "--url", url, "--artifacts", str(ARTIFACTS)]
    for key, value in args.items():
        cmd += [f"--{key}", str(value)]
    with trio.fail_after(SCENARIO_TIMEOUT):
        proc = await trio.run_process(cmd, cwd=HERE, capture_stdout=True, capture_stderr=True, check=False)
    stdout, stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    lines = stdout.strip().splitlines()
    where = f"\n--- stdout:\n{stdout[-4000:]}\n--- stderr:\n{stderr[-4000:]}"
    assert lines, f"{script} {scenario} printed nothing (exit {proc.returncode}){where}"
    out: dict[str, Any] = json.loads(lines[-1])
    assert proc.returncode == 0 and "error" not in out, (
        f"{script} {scenario} failed (screenshots in {ARTIFACTS}): {out.get('error')}\nbrowser log: {out.get('logs')}"
    )
    return out


def page_errors(out: dict[str, Any]) -> list[str]:
    """Script errors the page raised (uncaught exceptions), which a working page never has."""
    return [line for line in out.get("logs", []) if "pageerror" in line]
