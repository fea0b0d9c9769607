"""Paths inside ComfyUI's directories and the in-memory file store's keys."""

from __future__ import annotations

import posixpath
from typing import Any

from ._constants import FILE_TYPES

# --- paths and the in-memory file store ---------------------------------------------------------------


def _safe_relative_path(path: str) -> str | None:
    """Normalize a path relative to a ComfyUI directory; None if it escapes it. The directory itself is ""."""
    if path.startswith("/"):
        return None
    normalized = posixpath.normpath(path) if path else "."
    if normalized == ".." or normalized.startswith("../"):
        return None
    return "" if normalized == "." else normalized


def _annotated_filepath(name: str) -> tuple[str, str | None]:
    """ComfyUI's annotated_filepath: "x.png [output]" → ("x.png", "output")."""
    for kind in FILE_TYPES:
        suffix = f" [{kind}]"
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return name, None


FileKey = tuple[str, str, str]  # (type, subfolder, filename)


def _format_value(value: Any) -> Any:
    """How ComfyUI shows an input value in execution_error.current_inputs."""
    return value if value is None or isinstance(value, (int, float, bool, str)) else str(value)
