"""The run service's runner: this process as a supervisor node, its dispatcher, and the
runs it executes.

``Runner(db, settings)`` is built with the servicers; ``run()`` is a background job
started once the server listens, ``stop()`` is called on shutdown.

``run()``:

1. registers a ``runs.supervisor_nodes`` row (host, boot id, pid, process start time,
   ``max_processes``) and renews its lease (:mod:`run_service.node_leases`);
2. dispatches until cancelled: a pass of :func:`run_service.dispatch.dispatch_pass`
   whenever a ``paperclip_runs_queued`` notification arrives (LISTEN on a dedicated
   asyncpg connection, reconnected when lost), a local run ends, or every
   ``settings.dispatch_poll_seconds`` (notifications can be lost).

Each claimed run is executed by its own task (:mod:`run_service.executor`), independent
of ``run()``: cancelling ``run()`` stops dispatching only.

3. recovers (:mod:`run_service.recovery`), in the background: a pass right after
   registering (the runs of this host's previous, crashed incarnation are adopted or
   lost-and-retried at once), then every ``recovery.INTERVAL_SECONDS``; adopted runs'
   pids are polled and count against ``max_processes``.

``stop()`` -- **shutdown policy** (decided): a *graceful* stop (SIGTERM: ``make run``'s
Ctrl-C, an orchestrator's stop) first stops dispatching (the pass in flight, if any, ends
and no other starts), then terminates every live child's process tree (SIGTERM, grace,
SIGKILL), adopted ones included, and finalizes its run as ``cancelled`` with error
``run service stopped``. A run this node claimed but has not spawned yet (issue lock,
checkout, or a requeue path) goes back to ``queued`` instead (no start time, no node, its
wake queued again: :func:`run_service.dispatch.requeue`), so another node or the next
start dispatches it: no ``process_lost``, no retry. Any run still ``running`` on this node
without a recorded process at the end (an execution that did not finish in time, a claim
of a pass cut off by cancelling ``run()``) is requeued the same way. Then the node row is
marked stopped (lease expired). A graceful stop cannot know whether this node will ever
start again, and an agent left without a supervisor has no timeout, no output capture and
a token that stays valid: so nothing is left running (user-asks row 6: kill the tree on
shutdown). Adoption (``process_detached``) is for what a graceful stop cannot cover: a
crash of the run service (SIGKILL, OOM, power loss of the service only). Agents run in
their own sessions, so they survive such a crash, and the next start of a node on this
host adopts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import asyncpg

from common import metrics, outage
from common.config import Settings
from common.database_url import asyncpg_dsn
from common.db import Database
from common.sql import probe
from run_service import dispatch, execution_store, finalize, node_leases
from run_service.executor import Execution, ExecutorContext, execute
from run_service.issue_client import IssueClient
from run_service.recovery import NodeRecovery
from run_service.workspace_client import WorkspaceClient

logger = logging.getLogger(__name__)

QUEUED_CHANNEL = "paperclip_runs_queued"
#: CancelRun served by another replica names a run here (payload: the run id).
CANCEL_CHANNEL = "paperclip_run_cancel"
CANCELLED_ELSEWHERE = "cancelled by control plane"
#: How often the idle LISTEN connection is probed (a dead peer may never close it).
LISTEN_PROBE_SECONDS = 30.0
STOP_REASON = "run service stopped"
#: How long stop() waits for the executions to end (after their trees got grace + kill).
STOP_TIMEOUT_SECONDS = 30.0
#: How long stop() waits for a dispatch pass in flight before cancelling it.
DISPATCH_STOP_SECONDS = 10.0


class Runner:
    """Dispatch and supervision of agent runs on this node (see the module docstring)."""

    def __init__(
        self, db: Database, settings: Settings, *, companies: set[str] | None = None
    ) -> None:
        self.db = db
        self.settings = settings
        #: The machine (or pod) this node runs its agents' processes on.
        self.hostname = settings.host
        #: Dispatch scope: None (production) claims queued runs of every company; a set
        #: limits this runner to those companies (tests share one database; the set may
        #: change while running).
        self.companies = companies
        #: This node's ``supervisor_nodes`` id, set once registered by :meth:`run`.
        self.node_id: str = ""
        self.issues = IssueClient(settings)
        self.workspaces = WorkspaceClient(settings)
        self._executions: dict[str, Execution] = {}
        self._kick = asyncio.Event()
        self._registered = asyncio.Event()
        self._stopping = False
        self._listener: asyncpg.Connection | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        #: Test seam (see :attr:`ExecutorContext.before_spawn`); None in production.
        self.before_spawn: Callable[[str], Awaitable[None]] | None = None
        self._background: set[asyncio.Task[object]] = set()
        #: Recovery passes and the runs this node adopted (process_detached).
        self.recovery = NodeRecovery(self)

    # -- public interface ---------------------------------------------------------

    @property
    def live_runs(self) -> list[str]:
        """The runs this node is executing right now (adopted ones included)."""
        return [*self._executions, *self.recovery.adopted]

    async def run(self) -> None:
        """Register the node, then renew its lease and dispatch until cancelled."""
        await self._register()
        tasks = [
            asyncio.create_task(
                node_leases.renew_forever(self.db, self.node_id), name="runner-lease"
            ),
            asyncio.create_task(self._listen_loop(), name="runner-listen"),
            asyncio.create_task(self.recovery.run_forever(), name="runner-recovery"),
        ]
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="runner-dispatch")
        try:
            await self._dispatcher
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._close_listener()

    async def wait_registered(self) -> None:
        """Until :meth:`run` has registered the node."""
        await self._registered.wait()

    def wake(self) -> None:
        """Ask for a dispatch pass now."""
        self._kick.set()

    async def cancel(self, run_id: str, reason: str) -> bool:
        """Cancel a run this node executes: its tree is terminated (SIGTERM, grace,
        SIGKILL) and the executor finalizes it as ``cancelled`` with ``reason``. A run not
        started yet never starts. False when this node does not supervise the run."""
        execution = self._executions.get(run_id)
        if execution is None:
            # An adopted run: its recorded tree is killed, then it ends cancelled.
            return self.recovery.stop_adopted(run_id, reason)
        execution.cancel(reason)
        return True

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` has begun."""
        return self._stopping

    def touch(self, run_id: str) -> bool:
        """Renew the idle timer of a local run (``ReportRunActivity``); False when this
        node does not supervise a spawned process for it."""
        execution = self._executions.get(run_id)
        return execution is not None and execution.touch()

    async def stop(self) -> None:
        """Stop dispatching, terminate every live child (adopted ones too) and finalize
        its run as cancelled (``run service stopped``), requeue the runs claimed but not
        spawned, mark the node stopped. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        self._kick.set()
        for execution in list(self._executions.values()):
            execution.stop(STOP_REASON)
        await self._stop_dispatching()
        executions = list(self._executions.values())
        for execution in executions:  # again: the claims of a pass that was in flight
            execution.stop(STOP_REASON)
        tasks = [e.task for e in executions if e.task is not None]
        adopted = asyncio.create_task(self.recovery.stop_all(STOP_REASON))
        tasks.append(adopted)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_SECONDS)
            if pending:
                # Only the after-run steps can be this slow (a peer service down).
                self.issues.closing()
                self.workspaces.closing()
                _, pending = await asyncio.wait(pending, timeout=5.0)
                for task in pending:
                    task.cancel()
        await self._requeue_unspawned()
        self.issues.closing()
        self.workspaces.closing()
        if self.node_id:
            await node_leases.mark_stopped(self.db, self.node_id)
        await self._close_listener()
        await self.issues.close()
        await self.workspaces.close()

    async def _stop_dispatching(self) -> None:
        """Let the dispatch pass in flight end (its claims become executions), bounded;
        ``_stopping`` keeps any other from starting."""
        task = self._dispatcher
        if task is None or task.done():
            return
        _, pending = await asyncio.wait({task}, timeout=DISPATCH_STOP_SECONDS)
        if pending:
            task.cancel()  # a claim it committed is requeued by _requeue_unspawned
            await asyncio.gather(task, return_exceptions=True)

    async def _requeue_unspawned(self) -> None:
        """Put back in the queue every run still ``running`` on this node with no process
        recorded (claimed, never spawned); ``dispatch.requeue`` re-checks both."""
        if not self.node_id:
            return
        try:
            async with self.db.unit_of_work() as tx:
                run_ids = await execution_store.unspawned_runs(tx, self.node_id)
            for run_id in run_ids:
                if await dispatch.requeue(self.db, run_id):
                    logger.info("claimed run requeued on stop", extra={"run_id": run_id})
        except Exception:
            logger.exception("requeueing claimed runs on stop failed")

    # -- node lease -----------------------------------------------------------------

    async def _register(self) -> None:
        self.node_id = await node_leases.register(
            self.db, hostname=self.hostname, max_processes=self.settings.max_processes
        )
        self._registered.set()
        logger.info("supervisor node registered", extra={"node_id": self.node_id})

    # -- dispatch -------------------------------------------------------------------

    async def _listen_loop(self) -> None:
        """LISTEN for queued runs; reconnect when the connection drops."""
        url = self.settings.database_url
        if url is None:
            return
        delay = 0.5
        while True:
            try:
                conn = await asyncpg.connect(asyncpg_dsn(url))
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                logger.warning("LISTEN connection failed", extra=outage.tagged(exc, error=str(exc)))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.5
            self._listener = conn
            try:
                await self._listen_on(conn)
                logger.warning("LISTEN connection lost, reconnecting")
            finally:
                self._listener = None
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)

    async def _listen_on(self, conn: asyncpg.Connection) -> None:
        """Listen on ``conn`` until it is lost (closed, or a liveness probe fails)."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        await conn.add_listener(QUEUED_CHANNEL, self._on_notify)
        await conn.add_listener(CANCEL_CHANNEL, self._on_cancel_notify)
        self._kick.set()  # whatever was queued while we were not listening
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), timeout=LISTEN_PROBE_SECONDS)
            if not lost.is_set():
                try:
                    await probe(conn, within=5)
                except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    return

    def _on_cancel_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        """CancelRun on another node cancelled a run this node may supervise."""
        execution = self._executions.get(str(payload))
        if execution is not None:
            execution.cancel(CANCELLED_ELSEWHERE)
        else:
            # Already terminal: the stop only kills what is left, its finalize is a no-op.
            self.recovery.stop_adopted(str(payload), CANCELLED_ELSEWHERE)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, _payload: object) -> None:
        self._kick.set()

    async def _close_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)

    async def _dispatch_loop(self) -> None:
        poll = self.settings.dispatch_poll_seconds
        while not self._stopping:
            self._kick.clear()
            more = False
            try:
                more = await self._dispatch_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("dispatch pass failed")
            if more:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout=poll)

    async def _dispatch_once(self) -> bool:
        """One pass; True when it filled every free slot (there may be more to claim)."""
        metrics.NODE_RUNS_RUNNING.set(len(self._executions) + len(self.recovery.adopted))
        capacity = self.settings.max_processes - len(self._executions) - len(self.recovery.adopted)
        if capacity <= 0 or self._stopping:
            return False
        scope = None if self.companies is None else sorted(self.companies)
        result = await dispatch.dispatch_pass(
            self.db, node_id=self.node_id, capacity=capacity, company_ids=scope
        )
        for run_id in result.cancelled:
            self._spawn_task(
                finalize.after_terminal(
                    self.db, self.issues, run_id, None, workspaces=self.workspaces
                )
            )
        context = ExecutorContext(
            db=self.db,
            settings=self.settings,
            issues=self.issues,
            workspaces=self.workspaces,
            node_id=self.node_id,
            before_spawn=self.before_spawn,
        )
        for claim in result.claims:
            execution = Execution(claim)
            self._executions[claim.run_id] = execution
            if self._stopping:
                execution.stop(STOP_REASON)
            execution.task = asyncio.create_task(
                self._execute(context, execution), name=f"run-{claim.run_id}"
            )
        return bool(result.claims) and len(result.claims) >= capacity

    async def _execute(self, context: ExecutorContext, execution: Execution) -> None:
        try:
            await execute(context, execution)
        finally:
            self._executions.pop(execution.run_id, None)
            self.wake()  # a slot is free, and a deferred run may be startable now

    def _spawn_task(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
