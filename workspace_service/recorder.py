"""The operation recorder: every command run in a workspace is one
``workspace_operations`` row.

The row is inserted as ``running`` (and committed, so the operation is visible while it
runs), the work runs, then the row gets its status, exit code, the kept tail of each
stream (``OutputTail``), excerpts, byte counts and digests. An exception marks the row
``failed`` with the error in its stderr and propagates; cancellation too (the row is
finished under a shield, so no operation stays ``running`` because its caller left).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from common.actor import Actor
from common.db import Database
from supervision.process_tree import create_time_of, kill_tree
from workspace_service import operation_store
from workspace_service.output_tail import OutputTail

logger = logging.getLogger(__name__)

#: Chunk size of output reads.
_READ_BYTES = 64 * 1024
#: After a command's shell exits, how long leftovers may keep its pipes open before
#: the rest of its process group is stopped.
_DRAIN_SECONDS = 2.0
#: Between SIGTERM and SIGKILL when a command is stopped.
KILL_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class OperationContext:
    """Who runs operations, for which company, workspace, run and issue, on which host."""

    company_id: str
    actor: Actor
    host: str
    workspace_id: str | None = None
    run_id: str | None = None
    issue_id: str | None = None


@dataclass
class Operation:
    """An operation in progress: what it writes and how it ends."""

    id: str
    phase: str
    command: str
    stdout: OutputTail = field(default_factory=OutputTail)
    stderr: OutputTail = field(default_factory=OutputTail)
    metadata: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    #: None: succeeded unless ``exit_code`` is non-zero.
    status: str | None = None

    def note(self, line: str) -> None:
        """A line of the service's own output, in the operation's stdout."""
        self.stdout.write_text(line)

    @property
    def final_status(self) -> str:
        if self.status is not None:
            return self.status
        return "failed" if self.exit_code not in (None, 0) else "succeeded"

    @property
    def succeeded(self) -> bool:
        return self.final_status == "succeeded"


class CommandFailedError(Exception):
    """A recorded command exited non-zero, timed out or could not start."""

    def __init__(self, operation: Operation, message: str) -> None:
        super().__init__(message)
        self.operation = operation


class Recorder:
    """Records the operations of one context (reference ``createRecorder``)."""

    def __init__(self, db: Database, context: OperationContext) -> None:
        self._db = db
        self.context = context
        self._ids: list[str] = []

    def with_workspace(self, workspace_id: str) -> Recorder:
        """A recorder for the same context, bound to ``workspace_id``."""
        ctx = self.context
        bound = Recorder(
            self._db,
            OperationContext(
                company_id=ctx.company_id,
                actor=ctx.actor,
                host=ctx.host,
                workspace_id=workspace_id,
                run_id=ctx.run_id,
                issue_id=ctx.issue_id,
            ),
        )
        bound._ids = self._ids
        return bound

    async def attach_workspace(self, workspace_id: str) -> None:
        """Back-fill ``workspace_id`` on the operations recorded before it existed."""
        if self._ids:
            async with self._db.unit_of_work() as tx:
                await operation_store.set_workspace_of(tx, workspace_id, self._ids)

    @asynccontextmanager
    async def operation(
        self,
        phase: str,
        command: str,
        *,
        cwd: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        parent_id: str | None = None,
    ) -> AsyncIterator[Operation]:
        """One recorded operation around the body of the ``async with``."""
        ctx = self.context
        actor_type, actor_id, _agent_id, actor_run_id = ctx.actor.audit_identity()
        async with self._db.unit_of_work() as tx:
            op_id = await operation_store.insert_operation(
                tx,
                {
                    "company_id": ctx.company_id,
                    "workspace_id": ctx.workspace_id,
                    "parent_id": parent_id,
                    "run_id": ctx.run_id or actor_run_id,
                    "issue_id": ctx.issue_id,
                    "actor_type": actor_type,
                    "actor_id": actor_id,
                    "phase": phase,
                    "command": command,
                    "cwd": cwd,
                    "host": ctx.host,
                    "metadata": json.dumps(dict(metadata or {}), default=str),
                },
            )
        op = Operation(id=op_id, phase=phase, command=command)
        self._ids.append(op.id)
        try:
            yield op
        except BaseException as exc:
            op.status = "failed"
            op.stderr.write_text(str(exc) or type(exc).__name__)
            await asyncio.shield(self._finish(op))
            raise
        await asyncio.shield(self._finish(op))

    async def run_command(
        self,
        phase: str,
        command: str,
        *,
        cwd: str,
        env: Mapping[str, str],
        # The command's own wall-clock limit, recorded with its outcome, not a cancel
        # scope of the caller.
        timeout: float,  # noqa: ASYNC109
        metadata: Mapping[str, Any] | None = None,
        parent_id: str | None = None,
        check: bool = False,
    ) -> Operation:
        """Run ``/bin/sh -c command`` in ``cwd`` as one recorded operation and return it.

        The command gets its own session; when it exits, leftovers of its group are
        stopped. On timeout or cancellation its whole tree is stopped. With ``check``,
        a failure raises ``CommandFailedError`` after it is recorded.
        """
        async with self.operation(
            phase, command, cwd=cwd, metadata=metadata, parent_id=parent_id
        ) as op:
            message = await _execute(op, command, cwd=cwd, env=env, timeout=timeout)
            if message:
                op.stderr.write_text(message)
                op.status = "failed"
        if check and not op.succeeded:
            raise CommandFailedError(op, message or f"command exited with {op.exit_code}")
        return op

    async def _finish(self, op: Operation) -> None:
        try:
            async with self._db.unit_of_work() as tx:
                await operation_store.finish_operation(
                    tx,
                    {
                        "id": op.id,
                        "status": op.final_status,
                        "exit_code": op.exit_code,
                        "stdout": op.stdout.text(),
                        "stderr": op.stderr.text(),
                        "stdout_excerpt": op.stdout.excerpt(),
                        "stderr_excerpt": op.stderr.excerpt(),
                        "stdout_bytes": op.stdout.total,
                        "stderr_bytes": op.stderr.total,
                        "stdout_sha256": op.stdout.sha256,
                        "stderr_sha256": op.stderr.sha256,
                        "metadata": json.dumps(op.metadata, default=str),
                    },
                )
        except Exception:
            logger.exception("recording the end of an operation failed", extra={"op": op.id})


async def _execute(
    op: Operation,
    command: str,
    *,
    cwd: str,
    env: Mapping[str, str],
    timeout: float,  # noqa: ASYNC109
) -> str | None:
    """Run the command, streaming into ``op``; a failure message, or None."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            command,
            cwd=cwd,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        return f"could not start the command in {cwd}: {exc.strerror or exc}"
    assert proc.stdout is not None and proc.stderr is not None
    create_time = create_time_of(proc.pid, default=0.0)
    readers = [
        asyncio.create_task(_pump(proc.stdout, op.stdout)),
        asyncio.create_task(_pump(proc.stderr, op.stderr)),
    ]
    try:
        try:
            op.exit_code = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            await kill_tree(proc.pid, proc.pid, create_time, KILL_GRACE_SECONDS)
            op.exit_code = await proc.wait()
            return f"timed out after {timeout:g} s; the command's process tree was stopped"
        _done, pending = await asyncio.wait(readers, timeout=_DRAIN_SECONDS)
        if pending:
            # Leftover processes of the command still hold its output open.
            await kill_tree(proc.pid, proc.pid, create_time, KILL_GRACE_SECONDS)
        return None
    except asyncio.CancelledError:
        await asyncio.shield(kill_tree(proc.pid, proc.pid, create_time, KILL_GRACE_SECONDS))
        raise
    finally:
        await asyncio.wait(readers, timeout=_DRAIN_SECONDS)
        for reader in readers:
            reader.cancel()
        if op.exit_code is not None and op.exit_code < 0:
            op.metadata.setdefault("signal", -op.exit_code)


async def _pump(stream: asyncio.StreamReader, tail: OutputTail) -> None:
    while chunk := await stream.read(_READ_BYTES):
        tail.write(chunk)
