"""Fixtures of the retention tests: a database of their own for the table tests (one
for the package), whose sweeps then see no other test's rows."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from common.config import Settings
from common.db import Database
from tests.conftest import Services
from tests.databases import fresh_database


@pytest.fixture(scope="package")
async def own_db(server_url: str) -> AsyncIterator[Database]:
    """A fresh migrated database for these tests."""
    async with fresh_database(server_url, "paperclip_retention") as url:
        database = Database(url, pool_size=10, max_overflow=10, name="retention-tests")
        try:
            yield database
        finally:
            await database.dispose()


@pytest.fixture
def settings(services: Services) -> Settings:
    """The suite's settings with the documented retention defaults."""
    return replace(services.settings)
