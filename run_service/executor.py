"""Executing one claimed run: issue lock, harness checkout, spawn, output, terminal write.

The steps, for a run the dispatcher has just claimed (``running``, no process yet):

1. **Issue lock** (issue runs): ``AcquireExecutionLock(issue, run, agent)``. While another
   live run holds it (``ISSUE_EXECUTION_LOCKED``) the run goes back to ``queued`` (no
   start time, no node) and does not start; the dispatcher skips it until the holder
   ends (no spinning). An unreachable issue service requeues it too.
   A graceful stop of the node (:meth:`Execution.stop`) before the spawn requeues the
   run the same way (no harness checkout is attempted once the stop has begun).
2. **Harness checkout**: if the issue is assigned to this agent and in todo / backlog /
   blocked (and the wake is not a mention), ``CheckoutIssue`` as the agent inside this
   run. A conflict is not fatal: it is recorded as a lifecycle event.
3. **Spawn** the agent's ``command`` in ``cwd`` with a minimal environment: ``PATH``,
   ``HOME``, ``LANG``/``LC_ALL`` of the service when set, then the agent's configured env,
   then the ``PAPERCLIP_*`` variables last so that config can never override them.
   A spawn failure ends the run ``failed``/``adapter_failed`` with the error.
4. **Identity before start**: one UPDATE writes pid, process group, create time, node and
   the limits snapshot, with the lifecycle event ``run started`` (the first event of the
   run's output; chunks read before it are held back until it is written).
5. **Output**: every chunk becomes a ``stdout``/``stderr`` event (UTF-8, invalid bytes
   replaced), batched (at most ~100 ms or 64 KiB per write); one ``output truncated``
   event marks the per-run cap. The token and env values never appear in events or logs.
6. **Exit** (awaited, not polled) -> :mod:`run_service.finalize`.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeAlias

from common import tracing
from common.config import Settings
from common.db import Database
from common.errors import FailedPrecondition, NotFound, PaperclipError, Unavailable
from common.protoconv import text_or_none
from common.run_tokens import mint_run_token
from paperclip.issues.v1 import issues_pb2
from run_service import dispatch, execution_store, finalize, run_store
from run_service.dispatch import Claim
from run_service.issue_client import IssueClient
from run_service.supervisor import (
    ProcessLimits,
    ProcessSpec,
    SpawnError,
    Stream,
    SupervisedProcess,
    spawn,
)
from run_service.workspace_client import WorkspaceClient

logger = logging.getLogger(__name__)

#: Output is written at most this often, or as soon as this much is pending.
FLUSH_INTERVAL_S = 0.1
FLUSH_BYTES = 64 * 1024
#: How long the end of a run (its last output, its terminal write) waits for a database
#: that is unavailable before giving up (the recovery pass then finds the run).
FINISH_RETRY_S = 600.0
#: Service variables passed on to agents (nothing else of the service's env is).
BASE_ENV_NAMES = ("PATH", "HOME", "LANG", "LC_ALL")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
#: Harness auto-checkout: the issue states it applies to, and the wakes it never does.
CHECKOUT_STATUSES = frozenset(
    {issues_pb2.ISSUE_STATUS_TODO, issues_pb2.ISSUE_STATUS_BACKLOG, issues_pb2.ISSUE_STATUS_BLOCKED}
)
NO_CHECKOUT_REASON_PREFIXES = ("issue_comment_mentioned", "execution_")

#: A run event to append: (type, message, payload).
_Event: TypeAlias = tuple[str, str, Mapping[str, Any] | None]


class Execution:
    """One run this node executes: its process (once spawned) and cancellation."""

    def __init__(self, claim: Claim) -> None:
        self.claim = claim
        self.run_id = claim.run_id
        self.process: SupervisedProcess | None = None
        self.cancel_reason: str | None = None
        #: Set by a graceful stop of the node: before spawn the run goes back to queued.
        self.stopping = False
        self.task: asyncio.Task[None] | None = None
        self._terminating: asyncio.Task[Any] | None = None

    def cancel(self, reason: str) -> None:
        """Stop the run: before spawn it never starts; after, its tree is terminated."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if self.process is not None and self._terminating is None:
            self._terminating = asyncio.create_task(self.process.terminate(reason))

    def stop(self, reason: str) -> None:
        """Graceful stop of the node: a run not spawned yet is requeued (queued, no start
        time, no node) instead of starting; a spawned one is cancelled with ``reason``."""
        self.stopping = True
        self.cancel(reason)

    def touch(self) -> bool:
        """Renew the idle timer (``ReportRunActivity``); False before spawn."""
        if self.process is None:
            return False
        self.process.touch()
        return True


@dataclass(frozen=True)
class ExecutorContext:
    """What every execution of a node shares."""

    db: Database
    settings: Settings
    issues: IssueClient
    node_id: str
    #: Releases the runs' environment leases after they end (None: the lease sweep does).
    workspaces: WorkspaceClient | None = None
    #: Test seam: awaited with the run id right before the spawn (after the issue steps),
    #: to hold a claimed run between claim and spawn. None in production.
    before_spawn: Callable[[str], Awaitable[None]] | None = None


def build_env(
    *,
    base: Mapping[str, str],
    config_env: Mapping[str, str],
    paperclip: Mapping[str, str],
) -> dict[str, str]:
    """The child's entire environment: base names of the service's env, then the agent's
    configured env, then ``PAPERCLIP_*`` (config never overrides these; any configured
    ``PAPERCLIP_*`` key is dropped)."""
    env = {name: base[name] for name in BASE_ENV_NAMES if base.get(name)}
    env.setdefault("PATH", DEFAULT_PATH)
    env.update({k: v for k, v in config_env.items() if not k.upper().startswith("PAPERCLIP_")})
    env.update(paperclip)
    return env


class OutputWriter:
    """Batches a run's output chunks into run events (see the module docstring)."""

    def __init__(self, db: Database, run_id: str) -> None:
        self._db = db
        self._run_id = run_id
        self._pending: list[_Event] = []
        self._pending_bytes = 0
        self._decoders = {
            "stdout": codecs.getincrementaldecoder("utf-8")(errors="replace"),
            "stderr": codecs.getincrementaldecoder("utf-8")(errors="replace"),
        }
        self._stored: dict[str, int] = {"stdout": 0, "stderr": 0}
        self._truncated = False
        self._dirty = False
        self._enabled = False
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None

    async def on_output(self, stream: Stream, data: bytes, truncated: bool) -> None:
        """The supervisor's output callback."""
        text = self._decoders[stream].decode(data, final=False)
        self._stored[stream] += len(data)
        self._dirty = True
        if text:
            self._pending.append((stream, text, None))
            self._pending_bytes += len(data)
        if truncated and not self._truncated:
            self._truncated = True
            self._pending.append(
                (
                    "lifecycle",
                    "output truncated: the run's log cap was reached",
                    {"truncated": True},
                )
            )
        if not self._enabled:
            return
        if self._pending_bytes >= FLUSH_BYTES:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.create_task(self._flush_later())

    def enable(self) -> None:
        """The run is started (its ``run started`` event written): write from now on."""
        self._enabled = True
        if self._dirty and self._timer is None:
            self._timer = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(FLUSH_INTERVAL_S)
        self._timer = None
        try:
            await self.flush()
        except Exception:
            logger.exception("writing run output failed", extra={"run_id": self._run_id})

    async def flush(self) -> None:
        """Write what is pending, unless the run is already terminal (its terminal event
        must stay last: output after it is dropped)."""
        async with self._lock:
            if not self._dirty:
                return
            events, pending_bytes = self._pending, self._pending_bytes
            self._pending, self._pending_bytes, self._dirty = [], 0, False
            try:
                async with self._db.unit_of_work() as tx:
                    status = await execution_store.lock_run_status(tx, self._run_id)
                    if status not in run_store.ACTIVE:
                        return
                    await run_store.append_events(tx, self._run_id, events)
                    await execution_store.record_output_progress(
                        tx,
                        self._run_id,
                        stdout_bytes=self._stored["stdout"],
                        stderr_bytes=self._stored["stderr"],
                        truncated=self._truncated,
                    )
            except BaseException:
                # Not written (the database is away, say): kept for the next flush.
                self._pending[:0] = events
                self._pending_bytes += pending_bytes
                self._dirty = True
                raise

    async def close(self) -> None:
        """Decode what the decoders still hold and write everything pending."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for stream, decoder in self._decoders.items():
            tail = decoder.decode(b"", final=True)
            if tail:
                self._pending.append((stream, tail, None))
                self._dirty = True
        self._enabled = True
        deadline = time.monotonic() + FINISH_RETRY_S
        while True:
            try:
                await self.flush()
                return
            except Unavailable:
                if time.monotonic() > deadline:
                    logger.exception("writing run output failed", extra={"run_id": self._run_id})
                    return
                await asyncio.sleep(1.0)  # the database is away: the output waits for it
            except Exception:
                logger.exception("writing run output failed", extra={"run_id": self._run_id})
                return


async def execute(ctx: ExecutorContext, execution: Execution) -> None:
    """Run one claimed run to its end (see the module docstring). Never raises."""
    run_id = execution.run_id
    issue_id = text_or_none(execution.claim.run["issue_id"])
    ended = False
    try:
        ended = await _execute(ctx, execution)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        logger.exception("run execution failed", extra={"run_id": run_id})
        await _finish(
            ctx,
            execution,
            finalize.RunResult("failed", "adapter_failed", f"run execution failed: {exc}"),
        )
        ended = True
    if ended:
        try:
            with tracing.run_span("run.after_terminal", run_id):
                await finalize.after_terminal(
                    ctx.db, ctx.issues, run_id, issue_id, workspaces=ctx.workspaces
                )
        except Exception:
            logger.exception("after-run steps failed", extra={"run_id": run_id})


async def _finish(ctx: ExecutorContext, execution: Execution, result: finalize.RunResult) -> None:
    """The terminal write, repeated while the database is unavailable (for up to
    ``FINISH_RETRY_S``): a run that ends during an outage is recorded once it is back."""
    deadline = time.monotonic() + FINISH_RETRY_S
    delay = 0.2
    while True:
        try:
            with tracing.run_span("run.finalize", execution.run_id):
                await finalize.finalize_run(ctx.db, execution.run_id, result)
            return
        except Unavailable:
            if time.monotonic() + delay > deadline:
                logger.exception("terminal write failed", extra={"run_id": execution.run_id})
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        except Exception:
            logger.exception("terminal write failed", extra={"run_id": execution.run_id})
            return


async def _execute(ctx: ExecutorContext, execution: Execution) -> bool:
    """The steps; True once the run is terminal (False: requeued, not started)."""
    pre_events: list[_Event] = []
    step = await _before_spawn(ctx, execution, pre_events)
    if step is not None:
        return step
    agent = execution.claim.agent
    limits = ProcessLimits(
        timeout_seconds=float(agent.timeout_seconds),
        idle_timeout_seconds=float(agent.idle_timeout_seconds),
        grace_seconds=float(max(1, agent.grace_seconds)),
    )
    writer = OutputWriter(ctx.db, execution.run_id)
    with tracing.agent_process_span(execution.run_id) as trace_env:
        process = await _spawn(ctx, execution, limits, writer, trace_env)
        if process is None:
            return True
        if not await _start(
            ctx, execution, process, limits=limits, writer=writer, pre_events=pre_events
        ):
            return True
        outcome = await process.wait()
        await writer.close()
        await _finish(
            ctx, execution, finalize.result_of(outcome, cancel_reason=execution.cancel_reason)
        )
    return True


async def _before_spawn(
    ctx: ExecutorContext, execution: Execution, pre_events: list[_Event]
) -> bool | None:
    """Everything up to the spawn: a stopping node requeues the run, the issue steps
    (:func:`_take_issue`), a cancellation ends it. None: go on and spawn; False:
    requeued; True: the run ended."""
    run_id = execution.run_id
    issue_id = text_or_none(execution.claim.run["issue_id"])
    if execution.stopping:  # claimed by the last pass of a stopping node
        await _requeue(ctx, run_id, "run service stopping")
        return False
    if issue_id is not None:
        wake_reason = execution.claim.run["wake_reason"] or ""
        with tracing.run_span("run.take_issue", run_id):
            step = await _take_issue(ctx, execution, issue_id, wake_reason, pre_events)
        if step is not None:
            return step
    if ctx.before_spawn is not None:
        await ctx.before_spawn(run_id)
    if execution.stopping:  # graceful stop before the spawn: back to the queue
        await _requeue(ctx, run_id, "run service stopping")
        return False
    if execution.cancel_reason is not None:
        await _finish(
            ctx, execution, finalize.RunResult("cancelled", "cancelled", execution.cancel_reason)
        )
        return True
    return None


async def _spawn(
    ctx: ExecutorContext,
    execution: Execution,
    limits: ProcessLimits,
    writer: OutputWriter,
    trace_env: Mapping[str, str],
) -> SupervisedProcess | None:
    """Start the agent's process (its output goes to ``writer``; ``trace_env`` names the
    run's trace); None when it cannot be started (the run has then ended ``failed`` /
    ``adapter_failed``)."""
    claim = execution.claim
    adapter = claim.agent.adapter
    env = _agent_env(
        ctx,
        claim,
        issue_id=text_or_none(claim.run["issue_id"]),
        wake_reason=claim.run["wake_reason"] or "",
    )
    env.update(trace_env)
    try:
        spec = ProcessSpec(
            argv=list(adapter.command), env=env, cwd=adapter.cwd or None, limits=limits
        )
        process = await spawn(spec, on_output=writer.on_output)
    except (SpawnError, ValueError, TypeError) as exc:
        await _finish(ctx, execution, finalize.RunResult("failed", "adapter_failed", str(exc)))
        return None
    execution.process = process
    return process


async def _start(
    ctx: ExecutorContext,
    execution: Execution,
    process: SupervisedProcess,
    *,
    limits: ProcessLimits,
    writer: OutputWriter,
    pre_events: list[_Event],
) -> bool:
    """Record the spawned process (:func:`_mark_started`) and let its output be
    written; False (the process terminated) when the run ended elsewhere meanwhile."""
    with tracing.run_span("run.mark_started", execution.run_id):
        started = await _mark_started(ctx, execution.claim, process, limits, pre_events)
    if not started:
        # Ended elsewhere (cancelled) between claim and spawn: stop what we started.
        await process.terminate("run is no longer running")
        await writer.close()
        return False
    writer.enable()
    if execution.cancel_reason is not None:
        execution.cancel(execution.cancel_reason)
    return True


def _agent_env(
    ctx: ExecutorContext, claim: Claim, *, issue_id: str | None, wake_reason: str
) -> dict[str, str]:
    """The agent process's environment: a minimal base, the agent's own entries, then
    the run's ``PAPERCLIP_*`` variables (its gateway, token and ids), which win."""
    agent = claim.agent
    token = mint_run_token(
        ctx.settings.jwt_secret, agent_id=agent.id, company_id=agent.company_id, run_id=claim.run_id
    )
    paperclip = {
        "PAPERCLIP_API_URL": ctx.settings.gateway_addr,
        "PAPERCLIP_AGENT_TOKEN": token,
        "PAPERCLIP_RUN_ID": claim.run_id,
        "PAPERCLIP_AGENT_ID": agent.id,
        "PAPERCLIP_COMPANY_ID": agent.company_id,
        "PAPERCLIP_WAKE_REASON": wake_reason,
    }
    if issue_id is not None:
        paperclip["PAPERCLIP_ISSUE_ID"] = issue_id
    return build_env(base=os.environ, config_env=agent.adapter.env, paperclip=paperclip)


async def _take_issue(
    ctx: ExecutorContext,
    execution: Execution,
    issue_id: str,
    wake_reason: str,
    pre_events: list[_Event],
) -> bool | None:
    """The issue steps: execution lock, then harness checkout. None: go on and spawn;
    False: requeued (the issue is locked by another live run); True: the run ended."""
    run_id = execution.run_id
    agent = execution.claim.agent
    try:
        issue = await ctx.issues.acquire_execution_lock(
            issue_id=issue_id, run_id=run_id, agent_id=agent.id
        )
    except FailedPrecondition as exc:
        if exc.reason == "ISSUE_EXECUTION_LOCKED":
            await _requeue(ctx, run_id, "issue locked by another live run")
            return False
        if exc.reason == "RUN_NOT_LIVE":
            return True  # cancelled meanwhile: terminal already
        await _finish(ctx, execution, finalize.RunResult("failed", "issue_lock_failed", str(exc)))
        return True
    except NotFound as exc:
        code = "issue_not_found" if exc.reason == "ISSUE_NOT_FOUND" else "agent_not_found"
        await _finish(ctx, execution, finalize.RunResult("failed", code, str(exc)))
        return True
    except PaperclipError as exc:  # Unavailable and the like: try again later
        logger.warning(
            "issue lock unavailable, run requeued", extra={"run_id": run_id, "reason": exc.reason}
        )
        await asyncio.sleep(ctx.settings.dispatch_poll_seconds)  # no spinning
        await _requeue(ctx, run_id, "issue service unavailable")
        return False
    if (
        not execution.stopping
        and issue.assignee_agent_id == agent.id
        and issue.status in CHECKOUT_STATUSES
        and not wake_reason.startswith(NO_CHECKOUT_REASON_PREFIXES)
    ):
        pre_events.append(await _harness_checkout(ctx, execution.claim, issue_id))
    return None


async def _harness_checkout(ctx: ExecutorContext, claim: Claim, issue_id: str) -> _Event:
    """Check the issue out for the run (as the agent); the event that records it."""
    try:
        await ctx.issues.checkout_issue(
            issue_id=issue_id,
            agent_id=claim.agent.id,
            company_id=claim.agent.company_id,
            run_id=claim.run_id,
        )
    except PaperclipError as exc:
        logger.info(
            "harness checkout refused",
            extra={"run_id": claim.run_id, "issue_id": issue_id, "reason": exc.reason},
        )
        return (
            "lifecycle",
            "harness checkout skipped",
            {"checkedOutByHarness": False, "reason": exc.reason, "issueId": issue_id},
        )
    return (
        "lifecycle",
        "issue checked out for the run",
        {"checkedOutByHarness": True, "issueId": issue_id},
    )


async def _mark_started(
    ctx: ExecutorContext,
    claim: Claim,
    process: SupervisedProcess,
    limits: ProcessLimits,
    pre_events: list[_Event],
) -> bool:
    """Persist the process identity and the ``run started`` event; False if the run is
    no longer ``running`` (ended by someone else meanwhile)."""
    agent = claim.agent
    async with ctx.db.unit_of_work() as tx:
        marked = await execution_store.mark_started(
            tx,
            claim.run_id,
            pid=process.pid,
            pgid=process.pgid,
            created=datetime.fromtimestamp(process.create_time, UTC),
            node_id=ctx.node_id,
            timeout_seconds=agent.timeout_seconds,
            idle_timeout_seconds=agent.idle_timeout_seconds,
            grace_seconds=int(limits.grace_seconds),
        )
        if not marked:
            return False
        started: _Event = (
            "lifecycle",
            "run started",
            {
                "pid": process.pid,
                "process_group_id": process.pgid,
                "node_id": ctx.node_id,
                "command": list(agent.adapter.command),
                "env_keys": sorted(agent.adapter.env),
            },
        )
        await run_store.append_events(tx, claim.run_id, [started, *pre_events])
    return True


async def _requeue(ctx: ExecutorContext, run_id: str, why: str) -> None:
    if await dispatch.requeue(ctx.db, run_id):
        logger.info("run requeued", extra={"run_id": run_id, "why": why})
