"""Where SQL lives: each service's statements in its store modules, and every piece of
SQL that names another service's schema in that service's ``foreign_reads.py``, so
that who reads whose tables is seen in one place.

A statement is a call of ``common.sql.sql`` or ``common.sql.Batch``, or a string (not a
docstring) that reads as SQL; the tests read the source, not the running code."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.layout.imports import source_files

# Each service's schema; ``audit`` is shared plumbing (common.audit), nobody's in particular.
SCHEMAS = {
    "issue_service": "issues",
    "run_service": "runs",
    "workspace_service": "workspaces",
    "gateway": "gateway",
}
STORE_NAMES = re.compile(r"(?:\w+_)?store|foreign_reads|retention")
SQL_TEXT = re.compile(r"\b(?:SELECT|INSERT INTO|DELETE FROM|UPDATE|FROM|JOIN)\s")
SCHEMA_NAME = re.compile(r"\b(issues|runs|workspaces|gateway)\.[a-z_]+\b")


def docstrings(tree: ast.Module) -> set[int]:
    """``id()`` of every docstring node of ``tree``."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def statements(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, text)`` of each statement or piece of SQL in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else None
            if isinstance(node.func, ast.Attribute):
                name = node.func.attr
            if name in ("sql", "Batch"):
                yield node.lineno, f"{name}(...)"
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in skip
            and SQL_TEXT.search(node.value)
        ):
            yield node.lineno, node.value


@pytest.mark.parametrize("service", sorted(SCHEMAS))
def test_statements_live_in_store_modules(service: str) -> None:
    misplaced = sorted(
        f"{module}:{line}"
        for module, path in source_files(service)
        if not STORE_NAMES.fullmatch(path.stem)
        for line, _ in statements(path)
    )
    assert misplaced == []


@pytest.mark.parametrize("service", sorted(SCHEMAS))
def test_other_services_schemas_are_read_only_in_foreign_reads(service: str) -> None:
    own = SCHEMAS[service]
    foreign = sorted(
        f"{module}:{line} reads {schema}"
        for module, path in source_files(service)
        if path.stem != "foreign_reads"
        for line, text in statements(path)
        for schema in {match.group(1) for match in SCHEMA_NAME.finditer(text)}
        if schema not in (own, "audit")
    )
    assert foreign == []


@pytest.mark.parametrize("service", sorted(SCHEMAS))
def test_foreign_reads_only_read(service: str) -> None:
    path = Path(source_files(service).__next__()[1]).parent / "foreign_reads.py"
    if not path.exists():
        return
    writes = re.compile(r"\b(?:INSERT INTO|DELETE FROM|UPDATE)\s+(\w+)\.")
    own = SCHEMAS[service]
    for line, text in statements(path):
        for match in writes.finditer(text):
            assert match.group(1) == own, f"{path.name}:{line} writes {match.group(1)}"
