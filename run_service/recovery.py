"""Recovery of ``running`` runs whose supervisor is gone: adoption, ``process_lost``,
exactly one automatic retry (docs/architecture.md, "Run liveness is the source of
truth").

**Which runs.** A pass looks at ``running`` runs whose supervisor node is *dead* and is
not this node (this node's own runs are supervised in memory): which nodes are dead is
decided by :mod:`run_service.dead_nodes`. A ``running`` run with no node at all (only
possible from a manual write) is treated as recorded on this host.

**Fencing.** Each run is claimed with ``UPDATE ... SET supervisor_node_id = :me WHERE
supervisor_node_id = :dead AND status = 'running'``: two nodes never handle the same run.

**Per run** (after the claim):

- the recorded process (pid + create time) is alive -> **adopted** (``process_detached``,
  :mod:`run_service.adopted_runs`): it keeps running, watched by this node;
- otherwise -> **reaped**: ``failed`` / ``process_lost`` with exactly one automatic retry
  (:mod:`run_service.lost_runs`).

**Scheduling.** The runner runs a pass right after registering (in the background: the
server already listens; dispatch is not held back), then every ``INTERVAL_SECONDS``.
Periodic and RPC passes take a transaction-level advisory lock so one replica sweeps at a
time (the periodic pass skips when another holds it; the RPC waits up to
``recovery_store.RPC_LOCK_WAIT_SECONDS``); each pass handles at most
``MAX_RUNS_PER_PASS`` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from common import metrics
from common.actor import Actor
from common.authz import require_instance_admin
from common.db import Database
from paperclip.runs.v1 import runs_pb2
from run_service import adopted_runs, lost_runs, recovery_store
from run_service.adopted_runs import AdoptedRun, AdoptedRuns, AdoptionHost
from run_service.dead_nodes import DeadNode, dead_nodes

logger = logging.getLogger(__name__)

#: How often a periodic pass runs.
INTERVAL_SECONDS = 10.0
#: Runs handled per pass at most (the next pass takes the rest).
MAX_RUNS_PER_PASS = 200
#: How long a pass waits for the issue-service steps of one run before leaving them to
#: the background (ReleaseRunLocks retries while the issue service is down).
AFTER_STEPS_WAIT_SECONDS = 5.0
#: pg advisory lock key of the sweep (one replica at a time).
SWEEP_LOCK_KEY = "runs.reap_orphaned_runs"


class RecoveryHost(AdoptionHost, Protocol):
    """What recovery needs of the runner of this node (its ``wake`` also asks for a
    dispatch pass when a retry was queued)."""

    hostname: str
    companies: set[str] | None


@dataclass
class PassResult:
    """What one pass did."""

    lost: list[str] = field(default_factory=list)
    detached: list[str] = field(default_factory=list)
    retries: list[str] = field(default_factory=list)
    skipped: bool = False  # another replica held the sweep lock


class NodeRecovery:
    """Recovery on behalf of one runner: passes, and the runs it adopted."""

    def __init__(self, host: RecoveryHost) -> None:
        self._host = host
        self.hostname = host.hostname
        self.adoption = AdoptedRuns(host)
        #: The runs this node adopted, by run id.
        self.adopted: dict[str, AdoptedRun] = self.adoption.runs
        #: Periodic passes (tests switch them off to drive passes themselves).
        self.periodic = True
        self.interval = INTERVAL_SECONDS
        self._pass_lock = asyncio.Lock()
        #: Set by :meth:`stop_all` (shutdown): no pass adopts or reaps any more.
        self.closed = False
        self._background: set[asyncio.Task[Any]] = set()

    # -- loops ------------------------------------------------------------------------

    async def run_forever(self) -> None:
        """A pass now (boot), then one every ``interval``; and the adopted-pid poller."""
        poller = asyncio.create_task(self.adoption.poll_forever(), name="recovery-poll")
        try:
            await self._safe_pass(boot=True)
            while True:
                await asyncio.sleep(self.interval)
                if self.periodic:
                    await self._safe_pass(boot=False)
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)

    async def _safe_pass(self, *, boot: bool) -> None:
        try:
            result = await metrics.timed_pass(
                "run_recovery", self.reap_pass(lock="none" if boot else "try")
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("recovery pass failed")
            return
        if result.lost or result.detached:
            logger.info(
                "recovery pass",
                extra={
                    "boot": boot,
                    "lost": result.lost,
                    "detached": result.detached,
                    "retries": result.retries,
                },
            )

    async def idle(self) -> None:
        """Until no pass is running (tests: after switching ``periodic`` off)."""
        async with self._pass_lock:
            return

    # -- one pass ---------------------------------------------------------------------

    async def reap_pass(self, *, lock: str = "try") -> PassResult:
        """One pass (see the module docstring). ``lock``: ``try`` (skip if another replica
        sweeps), ``wait`` (wait for it, bounded) or ``none`` (boot: fencing suffices)."""
        async with self._pass_lock:
            if lock == "none":
                return await self._pass()
            db = self._host.db
            async with db.unit_of_work() as lock_tx:
                if lock == "wait":
                    await recovery_store.wait_sweep_lock(lock_tx, SWEEP_LOCK_KEY)
                elif not await recovery_store.try_sweep_lock(lock_tx, SWEEP_LOCK_KEY):
                    return PassResult(skipped=True)
                return await self._pass()

    async def _pass(self) -> PassResult:
        host = self._host
        me = host.node_id
        result = PassResult()
        if not me or self.closed:
            return result
        dead = await dead_nodes(host.db, me, self.hostname)
        scope = None if host.companies is None else sorted(host.companies)
        async with host.db.unit_of_work() as tx:
            rows = await recovery_store.orphan_runs(
                tx,
                nodes=[n.id for n in dead.values()],
                nodeless=True,
                companies=scope,
                limit=MAX_RUNS_PER_PASS,
            )
        for row in rows:
            old = str(row["supervisor_node_id"]) if row["supervisor_node_id"] else None
            node = dead.get(old) if old else None
            local = node.local if node is not None else True
            try:
                await self._recover_one(str(row["id"]), old, local, node, result)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("recovering a run failed", extra={"run_id": str(row["id"])})
        return result

    async def _recover_one(
        self, run_id: str, old: str | None, local: bool, node: DeadNode | None, result: PassResult
    ) -> None:
        host = self._host
        async with host.db.unit_of_work() as tx:
            run = await recovery_store.claim_run(tx, run_id, me=host.node_id, old=old)
            if run is None:
                return  # ended meanwhile, or another node claimed it first
            if local and adopted_runs.recorded_process_alive(run):
                await self.adoption.adopt(tx, run)
                result.detached.append(run_id)
                return
        # Lost. The claim is committed: this node alone handles the run from here on.
        node_host = node.host if node is not None else None
        retry_id = await lost_runs.reap(
            host.db, host.node_id, run, local=local, node_host=node_host
        )
        result.lost.append(run_id)
        if retry_id is not None:
            result.retries.append(retry_id)
            host.wake()
        await self._after_steps(
            lost_runs.after_lost(host.db, host.issues, host.workspaces, run, retry_id)
        )

    async def _after_steps(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run the issue-service steps; wait a little, then leave them in the background."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        try:
            await asyncio.wait_for(asyncio.shield(task), AFTER_STEPS_WAIT_SECONDS)
        except TimeoutError:
            logger.warning("recovery issue steps still running in the background")
        except Exception:
            logger.exception("recovery issue steps failed")

    # -- adopted runs -----------------------------------------------------------------

    def stop_adopted(self, run_id: str, reason: str) -> bool:
        """Kill an adopted run's tree and end it ``cancelled`` (``reason``), in the
        background; False if this node did not adopt the run."""
        return self.adoption.stop(run_id, reason)

    async def stop_all(self, reason: str) -> None:
        """Shutdown: no more passes, stop every adopted run (see :meth:`stop_adopted`)
        and wait for them and for the issue-service steps left in the background."""
        self.closed = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle(), timeout=adopted_runs.DEFAULT_GRACE_SECONDS)
        await self.adoption.stop_all(reason, wait_seconds=adopted_runs.DEFAULT_GRACE_SECONDS + 10)
        pending = list(self._background)
        if pending:
            await asyncio.wait(pending, timeout=5.0)


class HasRecovery(Protocol):
    """The runner as the ReapOrphanedRuns RPC sees it."""

    recovery: NodeRecovery

    async def wait_registered(self) -> None:
        """Until the node is registered."""
        ...


async def reap_orphaned_runs(
    db: Database, runner: HasRecovery, actor: Actor
) -> runs_pb2.ReapOrphanedRunsResponse:
    """``ReapOrphanedRuns``: instance admins or services; one pass now (waiting, bounded,
    for a pass of another replica). ``reaped``/``run_ids``: the runs ended
    ``process_lost``; ``detached_run_ids``: the runs adopted as ``process_detached``."""
    del db  # the runner's database is the one recovery writes to
    require_instance_admin(actor)
    await runner.wait_registered()
    result = await runner.recovery.reap_pass(lock="wait")
    return runs_pb2.ReapOrphanedRunsResponse(
        reaped=len(result.lost), run_ids=result.lost, detached_run_ids=result.detached
    )


__all__ = [
    "HasRecovery",
    "NodeRecovery",
    "PassResult",
    "RecoveryHost",
    "reap_orphaned_runs",
]
