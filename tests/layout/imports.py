"""The repository's own import graph, read from the source (``ast``): which first-party
modules each module imports, at the top or inside a function."""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Top-level packages of ours, where their source lives.
PACKAGES = {
    "common": REPO / "common",
    "supervision": REPO / "supervision",
    "local_suite": REPO / "local_suite",
    "issue_service": REPO / "issue_service",
    "run_service": REPO / "run_service",
    "workspace_service": REPO / "workspace_service",
    "gateway": REPO / "gateway",
    "paperclip_cli": REPO / "paperclip_cli",
    "paperclip_client": REPO / "clients" / "python" / "paperclip_client",
}
# Generated from protos/ (by `make proto`, and inside the image).
GENERATED = "paperclip"


def source_files(package: str) -> Iterator[tuple[str, Path]]:
    """``(module name, path)`` of every module of ``package``."""
    root = PACKAGES[package]
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join((package, *parts)), path


def module_path(module: str) -> Path | None:
    """The source file of first-party ``module``, or ``None`` if it is not ours."""
    package, _, rest = module.partition(".")
    root = PACKAGES.get(package)
    if root is None:
        return None
    base = root.joinpath(*rest.split(".")) if rest else root
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, module: str, *, at_load: bool = False) -> set[str]:
    """Every module ``path`` (the source of ``module``) imports, absolute names; for
    ``from a import b``, ``a.b`` too when that is a module of ours. ``at_load``: only
    what runs when the module is loaded, its module-level imports (not those inside
    functions or ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in tree.body if at_load else ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            found.add(base)
            for alias in node.names:
                if module_path(f"{base}.{alias.name}") is not None:
                    found.add(f"{base}.{alias.name}")
    return found


def cycles(graph: Mapping[str, Collection[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm,
    iterative): each is a set of modules that import one another in a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(graph[nxt])))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
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
    return found


def closure(roots: Iterable[str]) -> set[str]:
    """The first-party modules reachable from ``roots`` through imports (packages'
    ``__init__`` modules included, as Python runs them)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        path = module_path(module)
        if path is None:
            continue
        seen.add(module)
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(imported_modules(path, module))
    return seen


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = parts[: len(parts) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)
