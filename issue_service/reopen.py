"""IssueLockService.ReopenIssue: a done or cancelled issue back to ``todo``.

The run service calls it when it promotes a deferred comment wake on an issue that was
closed meanwhile: a board user's comment asked for more
work, so the promoted run must find the issue open. Whether a wake warrants a reopen is
the run service's decision; this is only the compare-and-set: done/cancelled -> todo,
anything else unchanged (so a repeat writes nothing).

Effects, as a comment's reopen: the status stamps of ``todo`` (``completed_at`` and
``cancelled_at`` cleared, locks cleared), one ``issue.updated`` audit row with
``reopened`` / ``reopenedFrom`` / ``source``, and an ``issue.status_changed`` outbox
event. No ``issue.reopened`` event: the promoted run *is* the wake it would cause.
"""

from __future__ import annotations

from common.actor import Actor
from common.authz import require_service
from common.db import Database
from common.errors import NotFound
from common.protoconv import text_or_none
from common.validation import parse_uuid, require_text
from issue_service import store
from issue_service.model import Status
from issue_service.status_moves import move_status
from paperclip.issues.v1 import issues_pb2

DEFAULT_SOURCE = "deferred_comment"
MAX_SOURCE = 100
REOPENABLE = frozenset({Status.DONE, Status.CANCELLED})


async def reopen_issue(
    db: Database, actor: Actor, *, issue_id: str, source: str
) -> tuple[issues_pb2.Issue, Status | None]:
    """(the issue as it is afterwards, the status it was reopened from or None)."""
    require_service(actor)
    issue = parse_uuid("issue_id", issue_id)
    assert issue
    why = require_text("source", source, max_length=MAX_SOURCE, required=False) or DEFAULT_SOURCE
    async with db.unit_of_work() as tx:
        row = await store.lock_issue(tx, issue)
        if row is None:
            raise NotFound("issue not found", reason="ISSUE_NOT_FOUND")
        previous = Status(row["status"])
        if previous not in REOPENABLE:
            return store.issue_to_proto(row), None
        updated = await move_status(
            tx,
            actor,
            row,
            Status.TODO,
            details={"reopened": True, "reopenedFrom": previous.value, "source": why},
            event_payload={
                "executionRunId": text_or_none(row["execution_run_id"]),
                "source": why,
            },
        )
        return store.issue_to_proto(updated), previous
