"""Fixtures of the run-service tests: a fresh company per test and callers on it."""

from __future__ import annotations

import pytest

from common.actor import Role
from tests.harness import Clients, Suite, admin, board, new_company


@pytest.fixture
async def admin_clients(suite: Suite) -> Clients:
    """Stubs calling as an instance admin."""
    return suite.clients(admin())


@pytest.fixture
async def company_id(admin_clients: Clients) -> str:
    """A new company (tests share one database)."""
    return (await new_company(admin_clients)).id


@pytest.fixture
async def owner(suite: Suite, company_id: str) -> Clients:
    """Stubs calling as an admin member of ``company_id``."""
    return suite.clients(board(company_id, Role.ADMIN, user_id="owner"))
