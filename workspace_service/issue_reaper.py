"""Stop the runtime services of isolated workspaces whose issue is closed (user asks
row 21: dev-server trees outlived ``done``).

A pass finds this host's live services of ``isolated_workspace`` workspaces whose
source issue is ``done`` or ``cancelled``. For each such workspace it first writes the
desired state ``stopped`` (so no start-up pass brings the services back) with an audit
row, then stops the services. Shared workspaces serve more than one issue and are left
alone. Passes run on every NOTIFY of ``paperclip_issue_events`` (the issue service's
outbox) and on a poll, because notifications can be lost; each host reaps its own
processes, and a pass repeated after a crash only finds what is still running.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from common.actor import SYSTEM_ACTOR
from common.audit import record_activity
from common.errors import PaperclipError
from common.notify_loop import run_passes
from workspace_service import commands, runtime_store, store
from workspace_service.model import RuntimeServiceRecord
from workspace_service.service_context import ServiceContext
from workspace_service.workspace_config import desired_state_patch, merge_config

logger = logging.getLogger(__name__)

CHANNEL = "paperclip_issue_events"
#: Services looked at per pass; a full batch is followed at once by another pass.
BATCH = 100
STOP_REASON = "issue_closed"


async def reap_once(ctx: ServiceContext) -> int:
    """One pass: how many services of closed issues' isolated workspaces were stopped."""
    async with ctx.db.unit_of_work() as tx:
        found = await runtime_store.closed_issue_services(tx, host=ctx.host, limit=BATCH)
    by_workspace: dict[str, list[RuntimeServiceRecord]] = {}
    for service in found:
        by_workspace.setdefault(service.workspace_id, []).append(service)
    stopped = 0
    for workspace_id, services in by_workspace.items():
        await _hold_stopped(ctx, workspace_id, services)
        for service in services:
            try:
                await ctx.runtime.stop_service(service, reason=STOP_REASON)
            except PaperclipError as exc:
                logger.warning("stopping a closed issue's service failed: %s", exc.message)
                continue
            stopped += 1
    return stopped


async def _hold_stopped(
    ctx: ServiceContext, workspace_id: str, services: Sequence[RuntimeServiceRecord]
) -> None:
    """Desired state ``stopped`` for every service of the workspace, audited."""
    async with ctx.db.unit_of_work() as tx:
        workspace = await store.get_workspace(tx, workspace_id, for_update=True)
        if workspace is None:
            return
        patch = desired_state_patch(
            workspace.config,
            action="stop",
            service_count=len(commands.services(workspace.config)),
            index=None,
        )
        await store.update_workspace(
            tx, workspace.id, {"config": merge_config(workspace.config, patch)}
        )
        record_activity(
            tx,
            actor=SYSTEM_ACTOR,
            company_id=workspace.company_id,
            action="execution_workspace.runtime_stop",
            entity_type="execution_workspace",
            entity_id=workspace.id,
            details={
                "reason": STOP_REASON,
                "issueId": workspace.source_issue_id,
                "runtimeServiceIds": [s.id for s in services],
            },
        )


async def reap_forever(ctx: ServiceContext, dsn: str, *, interval: float) -> None:
    """Reap until cancelled: a pass on every NOTIFY on ``paperclip_issue_events`` and at
    least every ``interval`` seconds. ``dsn`` is a plain asyncpg DSN for the LISTEN
    connection; errors are logged and the pass retried."""

    async def one_pass() -> bool:
        return await reap_once(ctx) >= BATCH

    await run_passes(
        dsn, CHANNEL, one_pass, interval=interval, what="reaping closed issues' services"
    )
