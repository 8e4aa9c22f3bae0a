"""Who may hold or take an issue's checkout: one rule, ``decide``, on facts read beforehand.

``decide`` reads nothing and writes nothing. Its callers (checkout and release in
``checkout``, the gate on agent writes in ``ownership_gate``) lock the issue row, clear
an execution lock whose run is terminal or missing (``locks.clear_if_terminal``), read
the statuses of the runs holding the remaining locks, ask ``decide`` and apply its
``Decision``:

- KEEP: go on as things are (the caller's run already holds the issue, or nothing
  needs holding: an unassigned issue, a board user, a comment by another agent);
- TAKE: check the issue out afresh with the conditional checkout UPDATE;
- TAKE_OVER: make the caller's run the holder in place, adopting a lock nobody holds
  or one held by a terminal or missing run (``stale_from``, audited as a takeover);
  a release that TAKE_OVER answers gives up that stale checkout;
- CLEAR_AND_TAKE: clear a stale checkout of an issue not held in progress, then TAKE;
- CONFLICT: refuse, with the error (``Refusal``) to raise.

The fast paths of ``checkout_store`` are this rule written as SQL for the common case.

- The fast checkout statement applies its UPDATE exactly when the locked row's
  execution run, if any, is live and ``decide(Action.CHECK_OUT, ...)`` on that row
  answers TAKE. Its WHERE is TAKE's condition (an expected status; unassigned, or
  assigned to the agent with no checkout or the run's own; the execution lock free or
  the run's own), after the refusals ``decide`` checks first (the agent missing, of
  another company or terminated; an open blocker) and the idempotent repeat it
  answers KEEP (the run already holds the in-progress issue). Where it applied,
  checkout does not ask ``decide`` again. Every other case goes to the slow path, which
  clears a stale execution lock and asks ``decide``: a repeat (KEEP) writes nothing,
  TAKE_OVER and CLEAR_AND_TAKE need the checkout run's status and an audit row, a
  refusal raises. ``tests/issue_service/test_ownership_fast_path.py`` sets rows up in
  PostgreSQL over a table of situations and checks the statement against ``decide``.
- The fast release statement releases when the execution run, if any, is live and,
  for an agent's run, no other run holds the checkout of the issue in progress: exactly
  the cases ``decide(Action.RELEASE, ...)`` would answer KEEP were the caller the
  assignee. It does not test the assignee; ``decide`` runs on the locked row after it,
  and its refusal of a caller that is not the assignee rolls the release back. A
  checkout held by another run (TAKE_OVER when that run is stale, CONFLICT when it is
  live) goes to the slow path. The same test checks this statement.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PaperclipError,
    PermissionDenied,
    invalid,
)
from issue_service.model import Status, run_is_stale


class Action(StrEnum):
    """What the caller is about to do to the issue."""

    CHECK_OUT = "check_out"
    RELEASE = "release"
    #: A change only the assignee's checkout run may make (UpdateIssue).
    WRITE = "write"
    #: An addition other agents of the company may make too (AddComment).
    APPEND = "append"


@dataclass(frozen=True)
class IssueFacts:
    """The locked issue row, as far as ownership goes."""

    id: str
    company_id: str
    status: str
    assignee_agent_id: str | None
    checkout_run_id: str | None
    execution_run_id: str | None
    #: The blockers that are not done (read for a checkout only).
    open_blockers: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgentFacts:
    """The agent a checkout is for; ``company_id`` and ``status`` are None when there is
    no such agent."""

    id: str
    company_id: str | None
    status: str | None


@dataclass(frozen=True)
class RunFacts:
    """The calling agent and its run. Board users and services have none."""

    agent_id: str | None
    run_id: str


@dataclass(frozen=True)
class Holders:
    """The statuses of the runs holding the issue's checkout and execution locks (None:
    no such run row, or no such lock)."""

    checkout: str | None = None
    execution: str | None = None


class Verdict(StrEnum):
    KEEP = "keep"
    TAKE = "take"
    TAKE_OVER = "take_over"
    CLEAR_AND_TAKE = "clear_and_take"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class Refusal:
    """The error a CONFLICT raises: its class, message, ErrorInfo reason and metadata
    (``field``: the request field of an INVALID_ARGUMENT)."""

    error: type[PaperclipError]
    message: str
    reason: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    field: str | None = None

    def exception(self) -> PaperclipError:
        if self.field is not None:
            return invalid(self.field, self.message)
        return self.error(self.message, reason=self.reason, metadata=self.metadata)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    #: TAKE_OVER, CLEAR_AND_TAKE: the stale run whose checkout is taken (None: none).
    stale_from: str | None = None
    #: CONFLICT: the error to raise.
    refusal: Refusal | None = None


KEEP = Decision(Verdict.KEEP)
TAKE = Decision(Verdict.TAKE)


def _take_over(stale_from: str | None) -> Decision:
    return Decision(Verdict.TAKE_OVER, stale_from=stale_from)


def _conflict(refusal: Refusal) -> Decision:
    return Decision(Verdict.CONFLICT, refusal=refusal)


def conflict_metadata(issue: IssueFacts, **extra: str) -> dict[str, str]:
    """The machine-readable description of who holds an issue."""
    data = {
        "issue_id": issue.id,
        "status": issue.status,
        "assignee_agent_id": issue.assignee_agent_id or "",
        "checkout_run_id": issue.checkout_run_id or "",
        "execution_run_id": issue.execution_run_id or "",
    }
    data.update(extra)
    return data


def decide(
    action: Action,
    issue: IssueFacts,
    agent: AgentFacts | None,
    run: RunFacts | None,
    holders: Holders,
    *,
    expected: Collection[str] = (),
) -> Decision:
    """Whether ``run`` (None: a board user or a service) may do ``action`` to the
    locked ``issue``, whose lock holders have the statuses ``holders``.

    A checkout needs ``agent`` (the agent it is for) and ``expected`` (the statuses it
    accepts); the other actions ignore them."""
    if action is Action.CHECK_OUT:
        if agent is None:
            raise ValueError("a checkout decision needs the facts of its agent")
        run_id = run.run_id if run is not None else None
        return _check_out(issue, agent, run_id, holders, frozenset(expected))
    if run is None:
        return KEEP
    if action is Action.RELEASE:
        return _release(issue, run, holders)
    return _write(issue, run, holders, others_may_append=action is Action.APPEND)


def needs_checkout_status(action: Action, issue: IssueFacts, run: RunFacts | None) -> bool:
    """Whether ``decide(action, issue, ..., run, holders)`` can depend on
    ``holders.checkout``, the status of the checkout run: always for a checkout (its
    refusal says whether the holder is live); for the other actions only when an agent's
    run other than the checkout run asks (a board user or a service is let through, the
    checkout run keeps what it holds). Callers read that status only then."""
    if action is Action.CHECK_OUT:
        return True
    checkout = issue.checkout_run_id
    return run is not None and checkout is not None and checkout != run.run_id


def _unassignable(issue: IssueFacts, agent: AgentFacts) -> Refusal | None:
    if agent.company_id is None:
        return Refusal(NotFound, "agent not found", "AGENT_NOT_FOUND", {"agent_id": agent.id})
    if agent.company_id != issue.company_id:
        return Refusal(
            InvalidArgument, "the agent must belong to the issue's company", field="agent_id"
        )
    if agent.status == "terminated":
        return Refusal(
            FailedPrecondition,
            "cannot assign work to a terminated agent",
            "AGENT_NOT_INVOKABLE",
            {"agent_id": agent.id, "agent_status": agent.status},
        )
    return None


def _blocked(issue: IssueFacts) -> Refusal | None:
    if not issue.open_blockers:
        return None
    return Refusal(
        FailedPrecondition,
        "issue is blocked by unresolved blockers",
        "ISSUE_BLOCKED",
        {"issue_id": issue.id, "unresolved_blocker_issue_ids": ",".join(issue.open_blockers)},
    )


def _owned_by(issue: IssueFacts, agent_id: str, run_id: str) -> bool:
    """Whether ``run_id`` of ``agent_id`` already holds the in-progress issue."""
    return (
        issue.status == Status.IN_PROGRESS
        and issue.assignee_agent_id == agent_id
        and issue.checkout_run_id == run_id
        and issue.execution_run_id in (None, run_id)
    )


def _free_for(
    issue: IssueFacts, agent_id: str, run_id: str | None, expected: frozenset[str]
) -> bool:
    """The condition of the checkout UPDATE: an expected status; unassigned, or the
    agent's with no checkout or the run's own; no execution lock but the run's own."""
    return (
        issue.status in expected
        and (
            issue.assignee_agent_id is None
            or (issue.assignee_agent_id == agent_id and issue.checkout_run_id in (None, run_id))
        )
        and issue.execution_run_id in (None, run_id)
    )


def _check_out(
    issue: IssueFacts,
    agent: AgentFacts,
    run_id: str | None,
    holders: Holders,
    expected: frozenset[str],
) -> Decision:
    refusal = _unassignable(issue, agent) or _blocked(issue)
    if refusal is not None:
        return _conflict(refusal)
    if run_id is not None and _owned_by(issue, agent.id, run_id):
        # A repeat by the owning run: no new lock time, no second audit row.
        return KEEP
    if _free_for(issue, agent.id, run_id, expected):
        return TAKE
    return _take_over_checkout(issue, agent.id, run_id, holders, expected)


def _take_over_checkout(
    issue: IssueFacts,
    agent_id: str,
    run_id: str | None,
    holders: Holders,
    expected: frozenset[str],
) -> Decision:
    """Adopt an unowned or stale lock of the agent's in-progress issue, take a stale
    checkout of an issue not in progress like a fresh one, or refuse."""
    mine = issue.assignee_agent_id == agent_id
    checkout, execution = issue.checkout_run_id, issue.execution_run_id
    checkout_stale = checkout is not None and run_is_stale(holders.checkout)
    if run_id is not None and mine and issue.status == Status.IN_PROGRESS:
        if checkout is None and execution in (None, run_id):
            return _take_over(None)
        if checkout_stale and execution in (None, run_id, checkout):
            return _take_over(checkout)
    if (
        run_id is not None
        and issue.status in expected
        and (mine or issue.assignee_agent_id is None)
        and checkout_stale
        and execution in (None, run_id, checkout)
    ):
        return Decision(Verdict.CLEAR_AND_TAKE, stale_from=checkout)
    return _conflict(checkout_conflict(issue, holders, expected))


def checkout_conflict(issue: IssueFacts, holders: Holders, expected: Collection[str]) -> Refusal:
    """The refusal of a checkout that lost: to a status it did not expect, to a live
    holder, or to another assignee."""
    holder = issue.checkout_run_id or issue.execution_run_id
    status = holders.checkout if issue.checkout_run_id else holders.execution
    holder_live = holder is not None and not run_is_stale(status)
    wrong_status = issue.status not in expected
    return Refusal(
        FailedPrecondition,
        "issue checkout conflict",
        "ISSUE_CHECKOUT_CONFLICT",
        conflict_metadata(
            issue,
            holder_run_id=holder or "",
            holder_live="true" if holder_live else "false",
            conflict="status" if wrong_status else ("live_holder" if holder_live else "assignee"),
            retryable="false",
        ),
    )


def _release(issue: IssueFacts, run: RunFacts, holders: Holders) -> Decision:
    """An agent releases its own issue, unless another live run holds it in progress."""
    if issue.assignee_agent_id != run.agent_id:
        return _conflict(
            Refusal(
                FailedPrecondition,
                "only the assignee can release the issue",
                "ISSUE_OWNERSHIP_CONFLICT",
                conflict_metadata(issue, actor_agent_id=run.agent_id or ""),
            )
        )
    checkout = issue.checkout_run_id
    if issue.status != Status.IN_PROGRESS or checkout in (None, run.run_id):
        return KEEP
    if run_is_stale(holders.checkout):
        return _take_over(checkout)
    return _conflict(
        Refusal(
            FailedPrecondition,
            "only the checkout run can release the issue",
            "ISSUE_OWNERSHIP_CONFLICT",
            conflict_metadata(issue, actor_run_id=run.run_id, holder_live="true"),
        )
    )


def _write(
    issue: IssueFacts, run: RunFacts, holders: Holders, *, others_may_append: bool
) -> Decision:
    """An agent writes to an unassigned issue, or to its own: in progress, only from the
    checkout run, or after adopting a lock nobody live holds. Others may only append."""
    assignee = issue.assignee_agent_id
    if assignee is None:
        return KEEP
    if assignee != run.agent_id:
        if others_may_append:
            return KEEP
        return _conflict(_not_the_assignee(issue, run))
    if issue.status != Status.IN_PROGRESS:
        return KEEP
    checkout, execution = issue.checkout_run_id, issue.execution_run_id
    if checkout == run.run_id:
        return KEEP
    if checkout is None and execution in (None, run.run_id):
        return _take_over(None)
    # Any execution run still set is live (the caller cleared a terminal one): a stale
    # checkout never hands over a live run's execution lock.
    if checkout is not None and execution in (None, run.run_id) and run_is_stale(holders.checkout):
        return _take_over(checkout)
    holder = execution if execution not in (None, run.run_id) else checkout
    return _conflict(
        Refusal(
            FailedPrecondition,
            "issue run ownership conflict",
            "ISSUE_OWNERSHIP_CONFLICT",
            conflict_metadata(
                issue,
                actor_agent_id=run.agent_id or "",
                actor_run_id=run.run_id,
                holder_run_id=holder or "",
                holder_live="true",
            ),
        )
    )


def _not_the_assignee(issue: IssueFacts, run: RunFacts) -> Refusal:
    if issue.status == Status.IN_PROGRESS:
        return Refusal(
            FailedPrecondition,
            "issue is checked out by another agent",
            "ISSUE_OWNERSHIP_CONFLICT",
            conflict_metadata(issue, actor_agent_id=run.agent_id or "", actor_run_id=run.run_id),
        )
    return Refusal(
        PermissionDenied,
        "agent cannot change another agent's issue",
        "AGENT_MISMATCH",
        {"issue_id": issue.id, "assignee_agent_id": issue.assignee_agent_id or ""},
    )
