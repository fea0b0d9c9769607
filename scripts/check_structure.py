#!/usr/bin/env python3
"""Check the repository's shape: no module over 400 code lines in actors/, web/, scripts/; no import cycle.

    python scripts/check_structure.py            # prints every problem; exit 1 if there is one
    python scripts/check_structure.py --max-lines 400 --typing-imports   # annotation-only cycles as well

Code lines are the lines that are neither blank nor only a comment (docstrings count). Imports are read with
``ast`` from every Python file of actors/, web/, scripts/ and tests/, with the module names Python gives them
(``scripts/`` and ``tests/`` are on the path, as in pyproject.toml): ``import``/``from`` statements anywhere in a
module count, deferred ones in functions too, except those under ``if TYPE_CHECKING:`` (annotations only). An
import cycle is a strongly connected component of more than one module. Importing ``a.b`` is an edge to ``a.b``
only: its parent package is already being imported when a submodule imports a sibling; so is ``from . import
sub`` when ``sub`` is a module.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Container, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZE_CHECKED = ("actors", "web", "scripts")
IMPORT_ROOTS = {"actors": ROOT / "actors", "web": ROOT / "web"}  # packages at the top level
PATH_DIRS = (ROOT / "scripts", ROOT / "tests")  # directories on sys.path: their files are top-level modules
MAX_CODE_LINES = 400


def code_lines(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def python_files() -> Iterator[Path]:
    for top in ("actors", "web", "scripts", "tests"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if "node_modules" not in path.parts:
                yield path


def module_name(path: Path) -> str:
    for base in PATH_DIRS:
        if path.is_relative_to(base):
            parts = path.relative_to(base).with_suffix("").parts
            break
    else:
        parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(
    tree: ast.Module, module: str, is_package: bool, *, known: Container[str] = (), typing: bool = False
) -> Iterator[str]:
    """Every module name this module may import at run time (the caller keeps the ones in the repository).

    ``from pkg import name`` is an import of the submodule ``pkg.name`` when ``known`` has it, else of ``pkg``.
    """
    package = module if is_package else module.rpartition(".")[0]
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking_only(node) and not typing:
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                qualified = f"{target}.{alias.name}" if target else alias.name
                yield qualified if qualified in known else target
        stack.extend(ast.iter_child_nodes(node))


def import_graph(*, typing: bool = False) -> dict[str, set[str]]:
    modules = {module_name(path): path for path in python_files()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        targets = imported_names(tree, name, path.name == "__init__.py", known=modules, typing=typing)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def oversized(max_lines: int) -> list[tuple[str, int]]:
    sizes = []
    for top in SIZE_CHECKED:
        for path in sorted((ROOT / top).rglob("*.py")):
            n = code_lines(path.read_text(encoding="utf-8"))
            if n > max_lines:
                sizes.append((str(path.relative_to(ROOT)), n))
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--max-lines", type=int, default=MAX_CODE_LINES, help="code lines a module may have")
    parser.add_argument(
        "--typing-imports", action="store_true", help="count imports under `if TYPE_CHECKING:` too (annotation cycles)"
    )
    args = parser.parse_args(argv)
    problems = [f"{path}: {n} code lines (more than {args.max_lines})" for path, n in oversized(args.max_lines)]
    problems += [
        f"import cycle: {' <-> '.join(component)}" for component in cycles(import_graph(typing=args.typing_imports))
    ]
    for line in problems:
        print(line)
    print(f"check_structure: {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
