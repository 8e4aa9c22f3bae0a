"""Runs whose process outlived its supervisor, adopted by this node: typically at boot,
the runs of this host's previous, crashed incarnation whose agent is still alive
(:mod:`run_service.recovery` claims them).

**Adoption.** A claimed run whose recorded process (pid + create time) is alive keeps
running, with ``error_code`` ``process_detached`` and "Lost in-memory process handle, but
child pid N is still alive", and a lifecycle event; this node now polls its pid (every
``POLL_SECONDS``), counts it against its process cap and kills its tree on ``CancelRun``
(and on shutdown, like any child). ``ReportRunActivity`` clears the marker.

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
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from common.db import Database
from common.protoconv import text_or_none
from common.sql import Row, Tx
from run_service import finalize, recovery_store, run_store
from run_service.issue_client import IssueClient
from run_service.workspace_client import WorkspaceClient
from supervision.process_tree import group_members, kill_tree, process_alive

logger = logging.getLogger("run_service.recovery")

#: How often the pids of adopted runs are polled.
POLL_SECONDS = 1.0
#: The grace period (TERM to KILL) of a run whose row records none.
DEFAULT_GRACE_SECONDS = 15
DETACHED_CODE = "process_detached"
ADOPTED_EXIT_ERROR = "Process exited while adopted after a restart; exit status unknown"


class AdoptionHost(Protocol):
    """What the adopted runs need of the runner of this node."""

    db: Database
    issues: IssueClient
    workspaces: WorkspaceClient
    node_id: str

    def wake(self) -> None:
        """Ask for a dispatch pass (a slot freed)."""
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


def grace_of(run: Row) -> float:
    """The grace period of a run's recorded process tree."""
    return float(run["grace_seconds"] or DEFAULT_GRACE_SECONDS)


def recorded_process_alive(run: Row) -> bool:
    """Whether the run's recorded process (pid + create time) is alive on this host."""
    pid = run["process_pid"]
    started = run["process_started_at"]
    create_time = started.timestamp() if started is not None else 0.0
    return bool(pid and started is not None and process_alive(int(pid), create_time))


class AdoptedRuns:
    """The runs this node adopted, by run id (:attr:`runs`), and their watch."""

    def __init__(self, host: AdoptionHost) -> None:
        self._host = host
        self.runs: dict[str, AdoptedRun] = {}

    async def adopt(self, tx: Tx, run: Row) -> None:
        """Mark the claimed run ``process_detached`` (in ``tx``) and watch it."""
        run_id, pid = str(run["id"]), int(run["process_pid"])
        error = f"Lost in-memory process handle, but child pid {pid} is still alive"
        node_id = self._host.node_id
        adopted_at = await recovery_store.mark_detached(tx, run_id, me=node_id, error=error)
        payload = {"warning": True, "error_code": DETACHED_CODE, "pid": pid, "node_id": node_id}
        await run_store.append_events(tx, run_id, [("lifecycle", error, payload)])
        self.runs[run_id] = AdoptedRun(
            run_id=run_id,
            pid=pid,
            pgid=int(run["process_group_id"] or pid),
            create_time=run["process_started_at"].timestamp(),
            issue_id=text_or_none(run["issue_id"]),
            grace=grace_of(run),
            adopted_at=adopted_at,
        )
        logger.warning("adopted a running agent process", extra={"run_id": run_id, "pid": pid})

    async def poll_forever(self) -> None:
        """:meth:`poll` every ``POLL_SECONDS`` until cancelled (a failed poll is logged)."""
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("polling adopted runs failed")

    async def poll(self) -> list[str]:
        """Finalize adopted runs whose process has ended, and stop (in the background)
        those past their wall-clock or idle limit (see the module docstring); their ids."""
        ended = []
        alive: list[AdoptedRun] = []
        for adopted in list(self.runs.values()):
            if adopted.stop_reason is not None:
                continue
            if process_alive(adopted.pid, adopted.create_time):
                alive.append(adopted)
                continue
            ended.append(adopted.run_id)
            await self._end(adopted, None)
        if alive:
            ended.extend(await self._enforce_limits(alive))
        return ended

    async def _enforce_limits(self, alive: list[AdoptedRun]) -> list[str]:
        """Stop (in the background) the runs of ``alive`` past a limit; their ids."""
        async with self._host.db.unit_of_work() as tx:
            rows = await recovery_store.adopted_limits(tx, [a.run_id for a in alive])
        by_id = {str(row["id"]): row for row in rows}
        stopped = []
        for adopted in alive:
            row = by_id.get(adopted.run_id)
            result = None if row is None else _limit_reached(row, adopted.adopted_at)
            if result is not None and adopted.stop_reason is None:
                logger.warning(
                    "adopted run exceeded its limit, stopping it",
                    extra={"run_id": adopted.run_id, "error_code": result.error_code},
                )
                self._stop(adopted, result)
                stopped.append(adopted.run_id)
        return stopped

    def stop(self, run_id: str, reason: str) -> bool:
        """Kill an adopted run's tree and end it ``cancelled`` (``reason``), in the
        background; False if this node did not adopt the run."""
        adopted = self.runs.get(run_id)
        if adopted is None:
            return False
        if adopted.stop_reason is None:
            self._stop(adopted, finalize.RunResult("cancelled", "cancelled", reason))
        return True

    async def stop_all(self, reason: str, *, wait_seconds: float) -> None:
        """Stop every adopted run (see :meth:`stop`) and wait up to ``wait_seconds``."""
        for run_id in list(self.runs):
            self.stop(run_id, reason)
        tasks = [a.task for a in self.runs.values() if a.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=wait_seconds)

    def _stop(self, adopted: AdoptedRun, result: finalize.RunResult) -> None:
        """Kill the tree and end the run with ``result``, in the background."""
        adopted.stop_reason = result.error or result.status
        adopted.task = asyncio.create_task(self._end(adopted, result))

    async def _end(self, adopted: AdoptedRun, stop: finalize.RunResult | None) -> None:
        """Kill what is left of the tree, then the terminal write and the after steps.
        ``stop``: how the run ends when this node stops it (its tree is killed first);
        None: its process exited on its own."""
        try:
            if stop is not None or group_members(adopted.pgid, adopted.create_time):
                await kill_tree(adopted.pid, adopted.pgid, adopted.create_time, adopted.grace)
            result = stop or finalize.RunResult("failed", "adapter_failed", ADOPTED_EXIT_ERROR)
            db = self._host.db
            ended = await finalize.finalize_run(db, adopted.run_id, result)
            self.runs.pop(adopted.run_id, None)  # its process slot is free
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
            self.runs.pop(adopted.run_id, None)
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
