"""Recovery of ``running`` runs whose supervisor is gone: adoption, ``process_lost``,
exactly one automatic retry (docs/architecture.md, "Run liveness is the source of
truth").

**Which runs.** A pass looks at ``running`` runs whose supervisor node is *dead* and is
not this node (this node's own runs are supervised in memory):

- a node on *this host* is dead when its row is stopped or its process is provably
  gone: another boot id, or its recorded (pid, process start) is no longer alive. So a
  node restarted after a crash (SIGKILL, OOM) takes its previous incarnation's runs at
  once, without waiting for the dead one's lease to run out, and a second live
  run-service process on the same host is never mistaken for dead (even if stalled
  past its lease);
- a node on *another host* is dead when its row is stopped or its lease expired
  (``lease_expires_at < now()``).
- A ``running`` run with no node at all (only possible from a manual write) is treated
  as recorded on this host.

A dead node on *another* host whose host still has a live node is left to that node (it
can check the processes locally). With no live node left on its host, its runs cannot be
checked from here: they are ``process_lost`` (the host is presumed gone; documented
limitation: if that host comes back with its agent processes alive, those processes are
not found by anyone, because their runs are already terminal).

**Fencing.** Each run is claimed with ``UPDATE ... SET supervisor_node_id = :me WHERE
supervisor_node_id = :dead AND status = 'running'``: two nodes never handle the same run.

**Per run** (after the claim):

- the recorded process (pid + create time) is alive -> **adopted**: it keeps running,
  ``error_code`` ``process_detached`` with "Lost in-memory process handle, but child pid
  N is still alive", a lifecycle event; this node now polls its pid (every
  ``POLL_SECONDS``), counts it against its process cap and kills its tree on ``CancelRun``
  (and on shutdown, like any child). ``ReportRunActivity`` clears the marker.
- otherwise -> ``failed`` / ``process_lost``: left-over members of its process group are
  killed first (TERM, grace, KILL, create-time checked); a run with no recorded pid was
  claimed but never spawned (reference B21). In the same transaction as the terminal
  write, **exactly one** retry is queued when ``process_loss_retry_count < 1``
  (``retry_of_run_id``, count + 1, retry reason ``process_lost``, wake reason
  ``process_lost_retry``, a wakeup row); after commit ``TransferExecutionLock`` moves the
  issue's lock to the retry (only if the old run still holds it). Without a retry (or if
  the retry cannot be inserted), ``ReleaseRunLocks`` + promotion of a deferred wake, as
  for any ended run. A second retry never happens.

**An adopted run that ends** on its own: its exit status cannot be known (it is not our
child), so the run ends ``failed`` / ``adapter_failed`` with "Process exited while adopted
after a restart; exit status unknown" (reconciliation requeues a continuation if the
issue is left open), then locks are released and a deferred wake promoted.

**Limits of an adopted run.** The pid poller also enforces the run's wall-clock and idle
timeouts, from the limits snapshot on its row (``timeout_seconds``,
``idle_timeout_seconds``; 0 or NULL: no limit), as the local supervisor would have:

- wall clock: ``started_at + timeout_seconds`` has passed -> ``timed_out`` / ``timeout``;
- idle: ``now - greatest(last_activity_at, last_output_at, adoption time)`` exceeds
  ``idle_timeout_seconds`` -> ``timed_out`` / ``idle_timeout``. The agent's output goes to
  pipes of the crashed supervisor and cannot be observed after adoption, so only
  ``ReportRunActivity`` (which moves ``last_activity_at``) keeps an adopted run alive.

Either way its recorded tree is killed first (TERM, ``grace_seconds``, KILL, create-time
checked), then the terminal write, ``ReleaseRunLocks`` and promotion, as for any end.

**Scheduling.** The runner runs a pass right after registering (in the background: the
server already listens; dispatch is not held back), then every ``INTERVAL_SECONDS``.
Periodic and RPC passes take a transaction-level advisory lock so one replica sweeps at a
time (the periodic pass skips when another holds it; the RPC waits up to
``RPC_LOCK_WAIT_SECONDS``); each pass handles at most ``MAX_RUNS_PER_PASS`` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from common import metrics
from common.actor import Actor
from common.authz import require_instance_admin
from common.db import Database
from common.errors import FailedPrecondition, PaperclipError
from common.outage import OUTAGE
from common.protoconv import text_or_none
from common.sql import Row, Tx, sql
from paperclip.runs.v1 import runs_pb2
from run_service import finalize, lost_runs, run_store
from run_service.issue_client import IssueClient
from run_service.workspace_client import WorkspaceClient
from supervision.process_tree import boot_id, group_members, kill_tree, process_alive

logger = logging.getLogger(__name__)

#: How often a periodic pass runs.
INTERVAL_SECONDS = 10.0
#: How often the pids of adopted runs are polled.
POLL_SECONDS = 1.0
#: Runs handled per pass at most (the next pass takes the rest).
MAX_RUNS_PER_PASS = 200
#: How long ReapOrphanedRuns waits for a pass of another replica to finish.
RPC_LOCK_WAIT_SECONDS = 10.0
#: How long a pass waits for the issue-service steps of one run before leaving them to
#: the background (ReleaseRunLocks retries while the issue service is down).
AFTER_STEPS_WAIT_SECONDS = 5.0
DEFAULT_GRACE_SECONDS = 15
#: pg advisory lock key of the sweep (one replica at a time).
SWEEP_LOCK_KEY = "runs.reap_orphaned_runs"
#: After a database outage, how long nodes of other hosts are not taken for dead on an
#: expired lease alone: a lease and a renewal interval (``runner.LEASE_SECONDS`` 15 s,
#: ``RENEW_SECONDS`` 5 s).
OUTAGE_GRACE_SECONDS = 20.0

DETACHED_CODE = "process_detached"
ADOPTED_EXIT_ERROR = "Process exited while adopted after a restart; exit status unknown"

_DEAD_NODE_CANDIDATES = sql(
    """
    SELECT n.id, n.host, n.boot_id, n.pid, n.process_started_at,
           n.stopped_at IS NOT NULL AS stopped,
           (n.stopped_at IS NOT NULL OR n.lease_expires_at < now()) AS expired
    FROM runs.supervisor_nodes n
    WHERE n.id <> CAST(:me AS uuid)
      AND EXISTS (SELECT 1 FROM runs.heartbeat_runs r
                  WHERE r.supervisor_node_id = n.id AND r.status = 'running')
    """
)
_LIVE_HOSTS = sql(
    """
    SELECT DISTINCT host FROM runs.supervisor_nodes
    WHERE stopped_at IS NULL AND lease_expires_at >= now()
    """
)
_ORPHAN_RUNS = sql(
    """
    SELECT id, supervisor_node_id FROM runs.heartbeat_runs
    WHERE status = 'running'
      AND (supervisor_node_id = ANY(CAST(:nodes AS uuid[]))
           OR (CAST(:nodeless AS boolean) AND supervisor_node_id IS NULL))
      AND (CAST(:companies AS uuid[]) IS NULL OR company_id = ANY(CAST(:companies AS uuid[])))
    ORDER BY started_at NULLS FIRST LIMIT :limit
    """
)
_CLAIM = sql(
    f"""
    UPDATE runs.heartbeat_runs SET supervisor_node_id = :me, updated_at = now()
    WHERE id = :id AND status = 'running'
      AND supervisor_node_id IS NOT DISTINCT FROM CAST(:old AS uuid)
    RETURNING {run_store.RUN_COLUMNS}
    """
)
_MARK_DETACHED = sql(
    """
    UPDATE runs.heartbeat_runs
    SET error_code = 'process_detached', error = :error, updated_at = now()
    WHERE id = :id AND status = 'running' AND supervisor_node_id = :me
    RETURNING now() AS adopted_at
    """
)
#: What the poller needs to enforce the limits of adopted runs (database clock).
_ADOPTED_LIMITS = sql(
    """
    SELECT id, now() AS now, started_at, timeout_seconds, idle_timeout_seconds,
           last_activity_at, last_output_at
    FROM runs.heartbeat_runs
    WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'running'
    """
)
_TRY_SWEEP_LOCK = sql("SELECT pg_try_advisory_xact_lock(hashtext(:key))")
_SWEEP_LOCK = sql("SELECT pg_advisory_xact_lock(hashtext(:key))")
_LOCK_TIMEOUT = sql(f"SET LOCAL lock_timeout = '{int(RPC_LOCK_WAIT_SECONDS * 1000)}ms'")


class RecoveryHost(Protocol):
    """What recovery needs of the runner of this node."""

    db: Database
    issues: IssueClient
    workspaces: WorkspaceClient
    node_id: str
    hostname: str
    companies: set[str] | None

    def wake(self) -> None:
        """Ask for a dispatch pass (a retry was queued, a slot freed)."""
        ...


@dataclass
class AdoptedRun:
    """A run whose process outlived its supervisor and is now watched by this node."""

    run_id: str
    pid: int
    pgid: int
    create_time: float
    issue_id: str | None
    grace: float
    #: When this node adopted it (database clock): the idle timer starts there at most.
    adopted_at: datetime
    #: Set once this node stops the run itself (cancel, shutdown, a limit): the poller
    #: leaves it.
    stop_reason: str | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)


@dataclass
class PassResult:
    """What one pass did."""

    lost: list[str] = field(default_factory=list)
    detached: list[str] = field(default_factory=list)
    retries: list[str] = field(default_factory=list)
    skipped: bool = False  # another replica held the sweep lock


@dataclass(frozen=True)
class _Node:
    id: str
    host: str
    local: bool


class NodeRecovery:
    """Recovery on behalf of one runner: passes, and the runs it adopted."""

    def __init__(self, host: RecoveryHost) -> None:
        self._host = host
        self.hostname = host.hostname
        self.adopted: dict[str, AdoptedRun] = {}
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
        poller = asyncio.create_task(self._poll_adopted_forever(), name="recovery-poll")
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
                    await lock_tx.execute(_LOCK_TIMEOUT)
                    await lock_tx.fetchval(_SWEEP_LOCK, {"key": SWEEP_LOCK_KEY})
                elif not await lock_tx.fetchval(_TRY_SWEEP_LOCK, {"key": SWEEP_LOCK_KEY}):
                    return PassResult(skipped=True)
                return await self._pass()

    async def _pass(self) -> PassResult:
        host = self._host
        me = host.node_id
        result = PassResult()
        if not me or self.closed:
            return result
        dead = await self._dead_nodes(me)
        scope = None if host.companies is None else sorted(host.companies)
        async with host.db.unit_of_work() as tx:
            rows = await tx.fetch(
                _ORPHAN_RUNS,
                {
                    "nodes": [n.id for n in dead.values()],
                    "nodeless": True,
                    "companies": scope,
                    "limit": MAX_RUNS_PER_PASS,
                },
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

    async def _dead_nodes(self, me: str) -> dict[str, _Node]:
        """The nodes other than ``me`` with running runs that this pass may take over."""
        async with self._host.db.unit_of_work() as tx:
            nodes = await tx.fetch(_DEAD_NODE_CANDIDATES, {"me": me})
            live_hosts = {r["host"] for r in await tx.fetch(_LIVE_HOSTS)}
        my_boot = boot_id()
        dead: dict[str, _Node] = {}
        for n in nodes:
            local = n["host"] == self.hostname
            if local:  # checked for sure; a stalled but live node keeps its runs
                gone = (
                    bool(n["stopped"])
                    or n["boot_id"] != my_boot
                    or not process_alive(int(n["pid"]), n["process_started_at"].timestamp())
                )
            else:
                # Right after a database outage every lease may have run out: nodes get
                # a lease's time to renew before another host's are taken for dead.
                gone = bool(n["expired"]) and not OUTAGE.ended_within(OUTAGE_GRACE_SECONDS)
            if not gone:
                continue
            if not local and n["host"] in live_hosts:
                continue  # a live node on that host checks its processes locally
            dead[str(n["id"])] = _Node(str(n["id"]), n["host"], local)
        return dead

    async def _recover_one(
        self, run_id: str, old: str | None, local: bool, node: _Node | None, result: PassResult
    ) -> None:
        me = self._host.node_id
        async with self._host.db.unit_of_work() as tx:
            run = await tx.fetchrow(_CLAIM, {"id": run_id, "me": me, "old": old})
            if run is None:
                return  # ended meanwhile, or another node claimed it first
            pid = run["process_pid"]
            started = run["process_started_at"]
            create_time = started.timestamp() if started is not None else 0.0
            if local and pid and started is not None and process_alive(int(pid), create_time):
                await self._adopt(tx, run)
                result.detached.append(run_id)
                return
        # Lost. The claim is committed: this node alone handles the run from here on.
        pgid = int(run["process_group_id"] or 0)
        grace = float(run["grace_seconds"] or DEFAULT_GRACE_SECONDS)
        descendants_killed = False
        if local and pid and started is not None and pgid and group_members(pgid, create_time):
            descendants_killed = True
            await kill_tree(int(pid), pgid, create_time, grace)
        message, extra = lost_runs.lost_message(
            run, local, node.host if node is not None else None, descendants_killed
        )
        retry_id = await lost_runs.write_lost(
            self._host.db, self._host.node_id, run, message, extra
        )
        result.lost.append(run_id)
        if retry_id is not None:
            result.retries.append(retry_id)
            self._host.wake()
        await self._after_steps(self._after_lost(run, retry_id))

    async def _adopt(self, tx: Tx, run: Row) -> None:
        run_id, pid = str(run["id"]), int(run["process_pid"])
        error = f"Lost in-memory process handle, but child pid {pid} is still alive"
        adopted_at = await tx.fetchval(
            _MARK_DETACHED, {"id": run_id, "me": self._host.node_id, "error": error}
        )
        await run_store.append_events(
            tx,
            run_id,
            [
                (
                    "lifecycle",
                    error,
                    {
                        "warning": True,
                        "error_code": DETACHED_CODE,
                        "pid": pid,
                        "node_id": self._host.node_id,
                    },
                )
            ],
        )
        self.adopted[run_id] = AdoptedRun(
            run_id=run_id,
            pid=pid,
            pgid=int(run["process_group_id"] or pid),
            create_time=run["process_started_at"].timestamp(),
            issue_id=text_or_none(run["issue_id"]),
            grace=float(run["grace_seconds"] or DEFAULT_GRACE_SECONDS),
            adopted_at=adopted_at,
        )
        logger.warning("adopted a running agent process", extra={"run_id": run_id, "pid": pid})

    async def _after_lost(self, run: Row, retry_id: str | None) -> None:
        run_id = str(run["id"])
        issue_id = text_or_none(run["issue_id"])
        issues = self._host.issues
        if retry_id is None:
            await finalize.after_terminal(
                self._host.db, issues, run_id, issue_id, workspaces=self._host.workspaces
            )
            return
        if issue_id is not None:
            try:
                await issues.transfer_execution_lock(
                    issue_id=issue_id, from_run_id=run_id, to_run_id=retry_id
                )
            except FailedPrecondition as exc:
                logger.info(
                    "lock not transferred to the retry",
                    extra={"run_id": run_id, "issue_id": issue_id, "reason": exc.reason},
                )
            except PaperclipError as exc:
                logger.warning(
                    "TransferExecutionLock failed; the retry acquires the lock itself",
                    extra={"run_id": run_id, "issue_id": issue_id, "reason": exc.reason},
                )
        # Whatever the old run still holds (nothing after a transfer) is released; its
        # environment leases end with it (the retry acquires its own).
        await asyncio.gather(
            issues.release_run_locks(run_id),
            finalize.release_run_leases(self._host.db, self._host.workspaces, run_id),
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

    async def _poll_adopted_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                await self.poll_adopted()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("polling adopted runs failed")

    async def poll_adopted(self) -> list[str]:
        """Finalize adopted runs whose process has ended, and stop (in the background)
        those past their wall-clock or idle limit (see the module docstring); their ids."""
        ended = []
        alive: list[AdoptedRun] = []
        for adopted in list(self.adopted.values()):
            if adopted.stop_reason is not None:
                continue
            if process_alive(adopted.pid, adopted.create_time):
                alive.append(adopted)
                continue
            ended.append(adopted.run_id)
            await self._end_adopted(adopted, None)
        if alive:
            async with self._host.db.unit_of_work() as tx:
                rows = await tx.fetch(_ADOPTED_LIMITS, {"ids": [a.run_id for a in alive]})
            by_id = {str(row["id"]): row for row in rows}
            for adopted in alive:
                row = by_id.get(adopted.run_id)
                result = None if row is None else _limit_reached(row, adopted.adopted_at)
                if result is not None and adopted.stop_reason is None:
                    logger.warning(
                        "adopted run exceeded its limit, stopping it",
                        extra={"run_id": adopted.run_id, "error_code": result.error_code},
                    )
                    self._stop(adopted, result)
                    ended.append(adopted.run_id)
        return ended

    def stop_adopted(self, run_id: str, reason: str) -> bool:
        """Kill an adopted run's tree and end it ``cancelled`` (``reason``), in the
        background; False if this node did not adopt the run."""
        adopted = self.adopted.get(run_id)
        if adopted is None:
            return False
        if adopted.stop_reason is None:
            self._stop(adopted, finalize.RunResult("cancelled", "cancelled", reason))
        return True

    def _stop(self, adopted: AdoptedRun, result: finalize.RunResult) -> None:
        """Kill the tree and end the run with ``result``, in the background."""
        adopted.stop_reason = result.error or result.status
        adopted.task = asyncio.create_task(self._end_adopted(adopted, result))

    async def stop_all(self, reason: str) -> None:
        """Shutdown: stop every adopted run (see :meth:`stop_adopted`) and wait."""
        self.closed = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle(), timeout=DEFAULT_GRACE_SECONDS)
        for run_id in list(self.adopted):
            self.stop_adopted(run_id, reason)
        tasks = [a.task for a in self.adopted.values() if a.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=DEFAULT_GRACE_SECONDS + 10)
        pending = list(self._background)
        if pending:
            await asyncio.wait(pending, timeout=5.0)

    async def _end_adopted(self, adopted: AdoptedRun, stop: finalize.RunResult | None) -> None:
        """Kill what is left of the tree, then the terminal write and the after steps.
        ``stop``: how the run ends when this node stops it (its tree is killed first);
        None: its process exited on its own."""
        try:
            if stop is not None or group_members(adopted.pgid, adopted.create_time):
                await kill_tree(adopted.pid, adopted.pgid, adopted.create_time, adopted.grace)
            result = stop or finalize.RunResult("failed", "adapter_failed", ADOPTED_EXIT_ERROR)
            db = self._host.db
            ended = await finalize.finalize_run(db, adopted.run_id, result)
            self.adopted.pop(adopted.run_id, None)  # its process slot is free
            self._host.wake()
            if ended:
                await finalize.after_terminal(
                    db,
                    self._host.issues,
                    adopted.run_id,
                    adopted.issue_id,
                    workspaces=self._host.workspaces,
                )
        except Exception:
            logger.exception("ending an adopted run failed", extra={"run_id": adopted.run_id})
        finally:
            self.adopted.pop(adopted.run_id, None)
            self._host.wake()


def _limit_reached(run: Row, adopted_at: datetime) -> finalize.RunResult | None:
    """The ``timed_out`` result of an adopted run past its wall-clock or idle limit (its
    row's snapshot; database clock), or None."""
    now: datetime = run["now"]
    timeout = int(run["timeout_seconds"] or 0)
    started: datetime | None = run["started_at"]
    if timeout > 0 and started is not None and now >= started + timedelta(seconds=timeout):
        return finalize.RunResult("timed_out", "timeout", f"timed out after {timeout} s")
    idle = int(run["idle_timeout_seconds"] or 0)
    if idle > 0:
        marks = (run["last_activity_at"], run["last_output_at"], adopted_at)
        last = max((mark for mark in marks if mark is not None), default=now)
        if (now - last).total_seconds() > idle:
            return finalize.RunResult(
                "timed_out",
                "idle_timeout",
                f"no activity for {idle} s (output of an adopted run cannot be observed)",
            )
    return None


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
    "AdoptedRun",
    "HasRecovery",
    "NodeRecovery",
    "PassResult",
    "RecoveryHost",
    "reap_orphaned_runs",
]
