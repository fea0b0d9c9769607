"""The repository is self-contained: no file in it sends the reader to a directory beside the clone."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# written in two pieces so that this file does not match itself
OUTSIDE = re.compile(
    re.escape("../" + "shared") + "|" + r"(?<![\w/.-])shared/(DESIGN|CONTRACT|STYLE|STACK-NOTES|comfyui)"
)


SKIPPED_DIRS = {".git", ".venv", "node_modules", "__pycache__", ".pytest_cache", ".hypothesis", "build", "data"}


def repository_files() -> list[Path]:
    """Tracked files and new ones not ignored: what a clone (or the next commit) holds. Outside a git checkout
    (an unpacked archive): every file but the generated ones."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        return [
            path
            for path in ROOT.rglob("*")
            if path.is_file()
            and not SKIPPED_DIRS.intersection(path.relative_to(ROOT).parts[:-1])
            and not any(part.endswith(".egg-info") for part in path.parts)
        ]
    return [ROOT / name for name in out.split("\0") if name and (ROOT / name).is_file()]


def test_nothing_points_outside_the_repository() -> None:
    files = repository_files()
    assert len(files) > 50 and ROOT / "README.md" in files
    hits = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary
        hits += [
            f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
            for n, line in enumerate(text.splitlines(), 1)
            if OUTSIDE.search(line)
        ]
    assert hits == []


def test_the_design_and_the_contract_are_in_the_repository() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for doc in ("DESIGN.md", "CONTRACT.md", "STYLE.md", "STACK-NOTES.md", "comfyui-protocol.md"):
        assert (ROOT / "docs" / doc).is_file(), doc
        assert f"docs/{doc}" in readme, doc


# a merge's conflict markers, written in pieces so that this file does not match itself
CONFLICT = re.compile("^(" + "<" * 7 + " |" + ">" * 7 + " |" + "=" * 7 + "$)")


def test_no_file_holds_a_merge_conflict_marker() -> None:
    hits = []
    for path in repository_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary
        hits += [f"{path.relative_to(ROOT)}:{n}" for n, line in enumerate(text.splitlines(), 1) if CONFLICT.match(line)]
    assert hits == []
