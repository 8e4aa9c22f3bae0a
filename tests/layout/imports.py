"""The repository's own import graph, read from the source (``ast``): which first-party
modules each module imports, at the top or inside a function."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
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


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module ``path`` (the source of ``module``) imports, absolute names; for
    ``from a import b``, ``a.b`` too when that is a module of ours."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            found.add(base)
            for alias in node.names:
                if module_path(f"{base}.{alias.name}") is not None:
                    found.add(f"{base}.{alias.name}")
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
