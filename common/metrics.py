"""The suite's Prometheus series, beside the per-RPC ones of ``common.interceptors``
(``paperclip_rpc_total``, ``paperclip_rpc_seconds``).

Each process serves those it updates at ``PAPERCLIP_METRICS_ADDR`` (``make run`` gives
every service its own address and lists them in the banner):

- ``paperclip_runs_queued`` / ``paperclip_runs_running``: the queue and the running runs
  of the whole database (run service; one read every ``GAUGE_INTERVAL_S``), and
  ``paperclip_node_runs_running``: the runs this run-service process executes;
- ``paperclip_run_outcomes_total{status,error_code}``: runs ended, by how;
- ``paperclip_lock_conflicts_total{reason}``: checkouts and lock calls refused because
  another run holds the issue, by reason (every service's refusals, counted where errors
  become status);
- ``paperclip_environment_leases_active``: environment leases held (workspace service);
- ``paperclip_sweep_seconds{sweep}``: how long each background pass took;
- ``paperclip_database_up``: 1 while this process's database answers, 0 during an outage.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram

from common.db import Database
from common.sql import sql

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

GAUGE_INTERVAL_S = 5.0

RUNS_QUEUED = Gauge("paperclip_runs_queued", "Runs waiting in the queue (all nodes)")
RUNS_RUNNING = Gauge("paperclip_runs_running", "Runs running (all nodes)")
NODE_RUNS_RUNNING = Gauge(
    "paperclip_node_runs_running", "Runs this run-service process executes or adopted"
)
RUN_OUTCOMES = Counter(
    "paperclip_run_outcomes", "Runs ended, by status and error code", ["status", "error_code"]
)
LOCK_CONFLICTS = Counter(
    "paperclip_lock_conflicts", "Checkouts and lock calls refused by a holder", ["reason"]
)
LEASES_ACTIVE = Gauge("paperclip_environment_leases_active", "Environment leases held")
SWEEP_SECONDS = Histogram(
    "paperclip_sweep_seconds",
    "Duration of one background pass",
    ["sweep"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
DATABASE_UP = Gauge("paperclip_database_up", "1 while the database answers, else 0")

#: The refusals counted as lock conflicts (API reasons).
LOCK_CONFLICT_REASONS = frozenset(
    {
        "ISSUE_CHECKOUT_CONFLICT",
        "ISSUE_OWNERSHIP_CONFLICT",
        "ISSUE_EXECUTION_LOCKED",
        "ISSUE_LOCK_NOT_HELD",
        "ENVIRONMENT_LEASE_HELD",
    }
)
for _reason in sorted(LOCK_CONFLICT_REASONS):
    LOCK_CONFLICTS.labels(_reason)  # every series exists, at 0, from the start
DATABASE_UP.set(1)


def count_refusal(reason: str) -> None:
    """Count a refused call (``common.interceptors``) when it is a lock conflict."""
    if reason in LOCK_CONFLICT_REASONS:
        LOCK_CONFLICTS.labels(reason).inc()


def count_outcome(status: str, error_code: str | None) -> None:
    RUN_OUTCOMES.labels(status, error_code or "").inc()


async def timed_pass(sweep: str, work: Awaitable[_T]) -> _T:
    """``await work``, its duration observed as ``paperclip_sweep_seconds{sweep}``."""
    with SWEEP_SECONDS.labels(sweep).time():
        return await work


_RUN_COUNTS = sql(
    """
    SELECT count(*) FILTER (WHERE status = 'queued') AS queued,
           count(*) FILTER (WHERE status = 'running') AS running
    FROM runs.heartbeat_runs WHERE status IN ('queued', 'running')
    """
)
_ACTIVE_LEASES = sql("SELECT count(*) FROM workspaces.environment_leases WHERE status = 'active'")


async def _run_counts(db: Database) -> None:
    async with db.unit_of_work() as tx:
        row = await tx.fetchrow(_RUN_COUNTS)
    assert row is not None
    RUNS_QUEUED.set(int(row["queued"]))
    RUNS_RUNNING.set(int(row["running"]))


async def _lease_count(db: Database) -> None:
    async with db.unit_of_work() as tx:
        LEASES_ACTIVE.set(int(await tx.fetchval(_ACTIVE_LEASES)))


async def gauges_forever(
    db: Database,
    read: Callable[[Database], Awaitable[None]],
    *,
    interval: float = GAUGE_INTERVAL_S,
) -> None:
    """``read(db)`` every ``interval`` seconds until cancelled; a failed read keeps the
    last values (the outage shows in ``paperclip_database_up``)."""
    while True:
        try:
            await read(db)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.debug("reading gauges failed", exc_info=True)
        await asyncio.sleep(interval)


async def run_gauges(db: Database) -> None:
    """The run service's queue and running-runs gauges, kept current."""
    await gauges_forever(db, _run_counts)


async def lease_gauges(db: Database) -> None:
    """The workspace service's lease gauge, kept current."""
    await gauges_forever(db, _lease_count)
