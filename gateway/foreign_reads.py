"""The gateway's reads of the issue and run services' tables, in the unit of work of the
caller. It never writes them.

- ``issues.companies``: which of the companies a new API key's memberships name exist.
- ``runs.heartbeat_runs``: the run of an agent run token (its status, agent and
  company), which must still be live for the token to authenticate.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.sql import Row, Tx, sql

_COMPANIES = sql("SELECT id FROM issues.companies WHERE id = ANY(CAST(:ids AS uuid[]))")
_RUN = sql("SELECT status, agent_id, company_id FROM runs.heartbeat_runs WHERE id = :id")


async def existing_companies(tx: Tx, company_ids: Sequence[str]) -> set[str]:
    """Those of ``company_ids`` that name a company."""
    return {str(r[0]) for r in await tx.fetch(_COMPANIES, {"ids": list(company_ids)})}


async def get_run(tx: Tx, run_id: str) -> Row | None:
    """The run (status, agent_id, company_id), or None."""
    return await tx.fetchrow(_RUN, {"id": run_id})
