"""``scripts/check_structure.py``: the repository itself has no module over 400 code lines in actors/, web/,
scripts/ and no import cycle; and what the check counts as code lines, imports and cycles, on small inputs."""

from __future__ import annotations

import ast

import pytest
from check_structure import MAX_CODE_LINES, code_lines, cycles, import_graph, imported_names, main, oversized

SOURCE = '''"""Docstrings count."""
# a comment does not

from typing import TYPE_CHECKING

from . import sibling
from ..up import thing
import pkg.other

if TYPE_CHECKING:
    from .annotations_only import T


def later() -> None:
    from .deferred import x  # still an import at run time
'''


def test_the_repository_has_no_oversized_module_and_no_import_cycle(capsys: pytest.CaptureFixture[str]) -> None:
    assert oversized(MAX_CODE_LINES) == []
    assert cycles(import_graph()) == []
    assert main([]) == 0 and capsys.readouterr().out == ""  # the script, as CI or a newcomer runs it


def test_the_check_fails_when_a_module_is_over_the_limit() -> None:
    assert oversized(50)  # the same walk over the repository, with a limit it cannot meet
    assert main(["--max-lines", "50"]) == 1


def test_code_lines_skip_blank_and_comment_lines() -> None:
    assert code_lines(SOURCE) == 9


def test_imports_resolve_relative_names_and_skip_type_checking_blocks() -> None:
    names = set(imported_names(ast.parse(SOURCE), "pkg.sub.mod", is_package=False, known={"pkg.sub.sibling"}))
    assert {"pkg.sub.sibling", "pkg.up", "pkg.other", "pkg.sub.deferred"} <= names
    assert "pkg.sub" not in names  # `from . import sibling` imports the module sibling, not the package again
    assert not any("annotations_only" in name for name in names)
    with_typing = set(imported_names(ast.parse(SOURCE), "pkg.sub.mod", is_package=False, typing=True))
    assert "pkg.sub.annotations_only" in with_typing


def test_a_package_init_resolves_relative_imports_inside_itself() -> None:
    names = set(imported_names(ast.parse("from ._impl import f\nfrom . import _other\n"), "pkg.sub", is_package=True))
    assert names == {"pkg.sub._impl", "pkg.sub"}  # _other is not a known module: an attribute of pkg.sub


def test_cycles_are_the_strongly_connected_components_of_two_or_more() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": {"f"}, "g": set()}
    assert cycles(graph) == [["a", "b", "c"], ["d", "e"]]
    assert cycles({"x": {"y"}, "y": set()}) == []
