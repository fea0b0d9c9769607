"""The relay benchmark's code; ``scripts/bench_relay.py`` runs it (its docstring says what it measures)."""

from ._cli import main

__all__ = ["main"]
