"""The one admission gate: which queued runs start, on which node, and when.

Every start path (wake, deferred-wake promotion, retry, recovery) only ever *queues* a
run; this module alone turns ``queued`` into ``running``. One pass, per agent with queued
runs (oldest queued run first), in one transaction per agent:

1. Lock the agent row (``SELECT ... FOR UPDATE``). Every dispatcher of every process
   takes this lock before counting, so the count below and the claim that follows are
   atomic with respect to any other dispatcher: two nodes can never exceed the limit.
2. Agent status: ``paused`` agents never start; their queued runs stay queued (they run
   after a resume). ``terminated`` agents never start either; their queued runs are
   cancelled at once with ``error_code`` ``agent_not_found`` and error
   ``agent terminated`` (nothing can ever run them), their wakes cancelled.
3. Free slots = ``max_concurrent_runs`` - the agent's ``running`` runs (all nodes),
   capped by the node's free process slots (``settings.max_processes`` - live local
   processes, passed in by the runner).
4. Pick the agent's queued runs in this order: issue in progress first, then other
   issue runs, then issue-less runs, then runs on a blocked issue; within a rank by issue
   priority (critical first), then age. Runs whose issue's execution lock is held by
   another live run are skipped (deferred: they start when the holder ends). The picked
   rows are locked ``FOR UPDATE SKIP LOCKED``.
5. Claim: ``UPDATE ... SET status='running', started_at, supervisor_node_id,
   last_activity_at WHERE status='queued'``, and the wakes -> ``claimed``, in the same
   transaction.

The claimed run counts as running from here on, so it takes its slot while the executor
acquires the issue lock and spawns the process. A run the executor cannot start yet (its
issue is locked) goes back to ``queued`` with :func:`requeue`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from common.db import Database
from common.sql import Row, Tx
from run_service import dispatch_store, run_store
from run_service.agent_config import AdapterSpec

logger = logging.getLogger(__name__)

#: Agents examined per pass (oldest queued run first); the next pass takes the rest.
MAX_AGENTS_PER_PASS = 200


@dataclass(frozen=True)
class AgentSnapshot:
    """What the executor needs of the agent, read under the admission lock."""

    id: str
    company_id: str
    adapter: AdapterSpec
    timeout_seconds: int
    idle_timeout_seconds: int
    grace_seconds: int


@dataclass(frozen=True)
class Claim:
    """A run this node has just claimed (now ``running``, not yet spawned)."""

    run: Row
    agent: AgentSnapshot

    @property
    def run_id(self) -> str:
        return str(self.run["id"])


@dataclass
class PassResult:
    """What one dispatch pass did."""

    claims: list[Claim]
    #: Runs cancelled because their agent is terminated (their locks need releasing).
    cancelled: list[str]


def _agent_snapshot(row: Row) -> AgentSnapshot:
    config = row["adapter_config"]
    if isinstance(config, str):
        config = json.loads(config)
    return AgentSnapshot(
        id=str(row["id"]),
        company_id=str(row["company_id"]),
        adapter=AdapterSpec.from_json(config or {}),
        timeout_seconds=int(row["timeout_seconds"]),
        idle_timeout_seconds=int(row["idle_timeout_seconds"]),
        grace_seconds=int(row["grace_seconds"]),
    )


async def dispatch_pass(
    db: Database, *, node_id: str, capacity: int, company_ids: list[str] | None = None
) -> PassResult:
    """Claim up to ``capacity`` queued runs for this node (see the module docstring);
    ``company_ids`` limits the pass to those companies (None: all)."""
    result = PassResult([], [])
    if capacity <= 0:
        return result
    async with db.unit_of_work() as tx:
        agents = await dispatch_store.agents_with_queued(
            tx, limit=MAX_AGENTS_PER_PASS, company_ids=company_ids
        )
    for agent_id in agents:
        room = capacity - len(result.claims)
        if room <= 0:
            break
        async with db.unit_of_work() as tx:
            await _admit_agent(tx, agent_id, node_id=node_id, room=room, result=result)
    return result


async def _admit_agent(
    tx: Tx, agent_id: str, *, node_id: str, room: int, result: PassResult
) -> None:
    agent = await dispatch_store.lock_agent(tx, agent_id)
    if agent is None:
        return
    if agent["status"] == "paused":
        return
    if agent["status"] == "terminated":
        await _cancel_for_terminated(tx, agent_id, result)
        return
    running = await dispatch_store.running_count(tx, agent_id)
    free = min(int(agent["max_concurrent_runs"]) - running, room)
    if free <= 0:
        return
    ids = await dispatch_store.pick(tx, agent_id, free)
    if not ids:
        return
    rows = await dispatch_store.claim(tx, ids, node_id)
    wakes = [str(r["wakeup_request_id"]) for r in rows if r["wakeup_request_id"] is not None]
    await dispatch_store.claim_wakes(tx, [str(r["id"]) for r in rows], wakes)
    snapshot = _agent_snapshot(agent)
    order = {run_id: index for index, run_id in enumerate(ids)}
    for row in sorted(rows, key=lambda r: order[str(r["id"])]):
        result.claims.append(Claim(row, snapshot))


async def _cancel_for_terminated(tx: Tx, agent_id: str, result: PassResult) -> None:
    rows = await dispatch_store.cancel_queued(tx, agent_id)
    if not rows:
        return
    ids = [str(r["id"]) for r in rows]
    wakes = [str(r["wakeup_request_id"]) for r in rows if r["wakeup_request_id"] is not None]
    await dispatch_store.cancel_wakes(tx, ids, wakes)
    for run_id in ids:
        await run_store.append_events(
            tx,
            run_id,
            [
                (
                    "lifecycle",
                    "run cancelled",
                    {
                        "terminal": True,
                        "status": "cancelled",
                        "error_code": "agent_not_found",
                        "error": "agent terminated",
                    },
                )
            ],
        )
    logger.info(
        "cancelled queued runs of a terminated agent", extra={"agent_id": agent_id, "runs": ids}
    )
    result.cancelled.extend(ids)


async def requeue(db: Database, run_id: str) -> bool:
    """Put a claimed run that never spawned back in the queue (its issue is locked by
    another live run): queued, no start time, no node. False if it was not ours to
    requeue any more (cancelled meanwhile)."""
    async with db.unit_of_work() as tx:
        row = await dispatch_store.requeue(tx, run_id)
        if row is None:
            return False
        await dispatch_store.requeue_wake(tx, run_id, row["wakeup_request_id"])
    return True
