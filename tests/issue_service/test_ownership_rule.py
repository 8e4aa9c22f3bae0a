"""``ownership.decide`` over a table of situations, one row each: what a checkout, a
release and an agent's write may do, and the refusals (ErrorInfo reason and metadata)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from common.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from issue_service.ownership import (
    Action,
    AgentFacts,
    Decision,
    Holders,
    IssueFacts,
    Refusal,
    RunFacts,
    Verdict,
    decide,
    needs_checkout_status,
)

COMPANY = "company-1"
A, B = "agent-a", "agent-b"
#: Agent a's current run, its earlier run, a run of agent b, a run with no row.
RUN, OLD, OTHER, GONE = "run-a", "run-a-earlier", "run-b", "run-gone"
TODO, IN_PROGRESS = frozenset({"todo"}), frozenset({"todo", "in_progress"})

AGENT_A = AgentFacts(A, COMPANY, "idle")
BY_A = RunFacts(A, RUN)
FREE = Holders()
LIVE, FINISHED, QUEUED, MISSING = "running", "succeeded", "queued", None


def issue(status: str = "todo", assignee: str | None = None, **locks: str) -> IssueFacts:
    return IssueFacts(
        id="issue-1",
        company_id=COMPANY,
        status=status,
        assignee_agent_id=assignee,
        checkout_run_id=locks.get("checkout"),
        execution_run_id=locks.get("execution"),
    )


def meta(row: IssueFacts, **extra: str) -> dict[str, str]:
    return {
        "issue_id": row.id,
        "status": row.status,
        "assignee_agent_id": row.assignee_agent_id or "",
        "checkout_run_id": row.checkout_run_id or "",
        "execution_run_id": row.execution_run_id or "",
        **extra,
    }


KEEP = Decision(Verdict.KEEP)
TAKE = Decision(Verdict.TAKE)


def take_over(stale_from: str | None) -> Decision:
    return Decision(Verdict.TAKE_OVER, stale_from=stale_from)


def refused(error: type, message: str, reason: str, metadata: dict[str, str]) -> Decision:
    return Decision(Verdict.CONFLICT, refusal=Refusal(error, message, reason, metadata))


def checkout_conflict(row: IssueFacts, holder: str, live: bool, conflict: str) -> Decision:
    metadata = meta(
        row,
        holder_run_id=holder,
        holder_live="true" if live else "false",
        conflict=conflict,
        retryable="false",
    )
    return refused(
        FailedPrecondition, "issue checkout conflict", "ISSUE_CHECKOUT_CONFLICT", metadata
    )


def ownership_conflict(message: str, row: IssueFacts, **extra: str) -> Decision:
    return refused(FailedPrecondition, message, "ISSUE_OWNERSHIP_CONFLICT", meta(row, **extra))


OWNED = issue("in_progress", A, checkout=RUN, execution=RUN)
OWNED_NO_EXECUTION = issue("in_progress", A, checkout=RUN)
MINE_UNLOCKED = issue("in_progress", A)
MINE_OLD_CHECKOUT = issue("in_progress", A, checkout=OLD)
MINE_OLD_LOCKS = issue("in_progress", A, checkout=OLD, execution=OLD)
MINE_GONE_CHECKOUT = issue("in_progress", A, checkout=GONE)
MINE_OLD_CHECKOUT_OTHER_EXECUTION = issue("in_progress", A, checkout=OLD, execution=OTHER)
THEIRS_LOCKED = issue("in_progress", B, checkout=OTHER, execution=OTHER)
THEIRS_TODO = issue("todo", B)
TODO_MINE_OLD_CHECKOUT = issue("todo", A, checkout=OLD)
TODO_FREE_OTHER_EXECUTION = issue("todo", None, execution=OTHER)
BLOCKED = replace(issue("todo", A), open_blockers=("blocker-1", "blocker-2"))

CheckoutCase = tuple[
    str, IssueFacts, AgentFacts, RunFacts | None, Holders, frozenset[str], Decision
]
CHECKOUT_CASES: list[CheckoutCase] = [
    ("unassigned todo issue: taken", issue(), AGENT_A, BY_A, FREE, TODO, TAKE),
    ("todo issue of the agent: taken", issue("todo", A), AGENT_A, BY_A, FREE, TODO, TAKE),
    (
        "the run's own unlocked checkout of a todo issue: taken",
        issue("todo", A, checkout=RUN),
        AGENT_A,
        BY_A,
        Holders(LIVE),
        TODO,
        TAKE,
    ),
    ("same run, in progress: kept", OWNED, AGENT_A, BY_A, Holders(LIVE, LIVE), TODO, KEEP),
    (
        "same run, checkout only: kept",
        OWNED_NO_EXECUTION,
        AGENT_A,
        BY_A,
        Holders(LIVE),
        TODO,
        KEEP,
    ),
    (
        "own in-progress issue, no locks: taken over",
        MINE_UNLOCKED,
        AGENT_A,
        BY_A,
        FREE,
        TODO,
        take_over(None),
    ),
    (
        "own in-progress issue, execution lock of the run only: taken over",
        issue("in_progress", A, execution=RUN),
        AGENT_A,
        BY_A,
        Holders(None, LIVE),
        TODO,
        take_over(None),
    ),
    (
        "same agent, new run, finished holder: taken over",
        MINE_OLD_CHECKOUT,
        AGENT_A,
        BY_A,
        Holders(FINISHED),
        TODO,
        take_over(OLD),
    ),
    (
        "same agent, new run, finished holder of both locks: taken over",
        MINE_OLD_LOCKS,
        AGENT_A,
        BY_A,
        Holders(FINISHED, FINISHED),
        TODO,
        take_over(OLD),
    ),
    (
        "same agent, new run, missing holder: taken over",
        MINE_GONE_CHECKOUT,
        AGENT_A,
        BY_A,
        Holders(MISSING),
        TODO,
        take_over(GONE),
    ),
    (
        "same agent, other live run: conflict with the live holder",
        MINE_OLD_CHECKOUT,
        AGENT_A,
        BY_A,
        Holders(LIVE),
        IN_PROGRESS,
        checkout_conflict(MINE_OLD_CHECKOUT, OLD, True, "live_holder"),
    ),
    (
        "same agent, other queued run: a live holder too",
        MINE_OLD_CHECKOUT,
        AGENT_A,
        BY_A,
        Holders(QUEUED),
        IN_PROGRESS,
        checkout_conflict(MINE_OLD_CHECKOUT, OLD, True, "live_holder"),
    ),
    (
        "same agent, stale checkout, another run's live execution lock: conflict",
        MINE_OLD_CHECKOUT_OTHER_EXECUTION,
        AGENT_A,
        BY_A,
        Holders(FINISHED, LIVE),
        IN_PROGRESS,
        checkout_conflict(MINE_OLD_CHECKOUT_OTHER_EXECUTION, OLD, False, "assignee"),
    ),
    (
        "other agent with live run, status not expected: conflict on the status",
        THEIRS_LOCKED,
        AGENT_A,
        BY_A,
        Holders(LIVE, LIVE),
        TODO,
        checkout_conflict(THEIRS_LOCKED, OTHER, True, "status"),
    ),
    (
        "other agent with live run: conflict with the live holder",
        THEIRS_LOCKED,
        AGENT_A,
        BY_A,
        Holders(LIVE, LIVE),
        IN_PROGRESS,
        checkout_conflict(THEIRS_LOCKED, OTHER, True, "live_holder"),
    ),
    (
        "other agent's stale checkout: conflict on the assignee",
        issue("in_progress", B, checkout=OTHER),
        AGENT_A,
        BY_A,
        Holders(FINISHED),
        IN_PROGRESS,
        checkout_conflict(issue("in_progress", B, checkout=OTHER), OTHER, False, "assignee"),
    ),
    (
        "todo issue of another agent: conflict on the assignee",
        THEIRS_TODO,
        AGENT_A,
        BY_A,
        FREE,
        TODO,
        checkout_conflict(THEIRS_TODO, "", False, "assignee"),
    ),
    (
        "todo issue with another run's live execution lock: conflict with it",
        TODO_FREE_OTHER_EXECUTION,
        AGENT_A,
        BY_A,
        Holders(None, LIVE),
        TODO,
        checkout_conflict(TODO_FREE_OTHER_EXECUTION, OTHER, True, "live_holder"),
    ),
    (
        "todo issue with the agent's finished checkout: cleared, then taken",
        TODO_MINE_OLD_CHECKOUT,
        AGENT_A,
        BY_A,
        Holders(FINISHED),
        TODO,
        Decision(Verdict.CLEAR_AND_TAKE, stale_from=OLD),
    ),
    (
        "unassigned todo issue with a missing run's checkout and execution: cleared, then taken",
        issue("todo", None, checkout=GONE, execution=GONE),
        AGENT_A,
        BY_A,
        Holders(MISSING, MISSING),
        TODO,
        Decision(Verdict.CLEAR_AND_TAKE, stale_from=GONE),
    ),
    (
        "todo issue with the agent's live earlier checkout: conflict with it",
        TODO_MINE_OLD_CHECKOUT,
        AGENT_A,
        BY_A,
        Holders(LIVE),
        TODO,
        checkout_conflict(TODO_MINE_OLD_CHECKOUT, OLD, True, "live_holder"),
    ),
    (
        "blocked issue",
        BLOCKED,
        AGENT_A,
        BY_A,
        FREE,
        TODO,
        refused(
            FailedPrecondition,
            "issue is blocked by unresolved blockers",
            "ISSUE_BLOCKED",
            {"issue_id": "issue-1", "unresolved_blocker_issue_ids": "blocker-1,blocker-2"},
        ),
    ),
    (
        "missing agent",
        issue(),
        AgentFacts(A, None, None),
        BY_A,
        FREE,
        TODO,
        refused(NotFound, "agent not found", "AGENT_NOT_FOUND", {"agent_id": A}),
    ),
    (
        "agent of another company",
        issue(),
        AgentFacts(A, "company-2", "idle"),
        BY_A,
        FREE,
        TODO,
        Decision(
            Verdict.CONFLICT,
            refusal=Refusal(
                InvalidArgument, "the agent must belong to the issue's company", field="agent_id"
            ),
        ),
    ),
    (
        "terminated agent, before the blockers",
        BLOCKED,
        AgentFacts(A, COMPANY, "terminated"),
        BY_A,
        FREE,
        TODO,
        refused(
            FailedPrecondition,
            "cannot assign work to a terminated agent",
            "AGENT_NOT_INVOKABLE",
            {"agent_id": A, "agent_status": "terminated"},
        ),
    ),
    (
        "terminated agent, even on its own issue",
        OWNED,
        AgentFacts(A, COMPANY, "terminated"),
        BY_A,
        Holders(LIVE, LIVE),
        TODO,
        refused(
            FailedPrecondition,
            "cannot assign work to a terminated agent",
            "AGENT_NOT_INVOKABLE",
            {"agent_id": A, "agent_status": "terminated"},
        ),
    ),
    ("board user, free issue: taken", issue("todo", A), AGENT_A, None, FREE, TODO, TAKE),
    (
        "board user, the agent's unlocked in-progress issue: taken",
        MINE_UNLOCKED,
        AGENT_A,
        None,
        FREE,
        IN_PROGRESS,
        TAKE,
    ),
    (
        "board user, in-progress issue not expected: no adoption without a run",
        MINE_UNLOCKED,
        AGENT_A,
        None,
        FREE,
        TODO,
        checkout_conflict(MINE_UNLOCKED, "", False, "status"),
    ),
    (
        "board user, issue with a checkout: conflict",
        issue("todo", A, checkout=OLD),
        AGENT_A,
        None,
        Holders(FINISHED),
        TODO,
        checkout_conflict(issue("todo", A, checkout=OLD), OLD, False, "assignee"),
    ),
]


@pytest.mark.parametrize("case", [pytest.param(case, id=case[0]) for case in CHECKOUT_CASES])
def test_checkout(case: CheckoutCase) -> None:
    _, row, agent, run, holders, expected, decision = case
    assert decide(Action.CHECK_OUT, row, agent, run, holders, expected=expected) == decision


RELEASE_CASES = [
    ("own checkout run", OWNED, BY_A, Holders(LIVE, LIVE), KEEP),
    ("own todo issue", issue("todo", A), BY_A, FREE, KEEP),
    (
        "own in-progress issue, no checkout",
        issue("in_progress", A, execution=OTHER),
        BY_A,
        Holders(None, LIVE),
        KEEP,
    ),
    (
        "own issue, not in progress, another live checkout",
        issue("in_review", A, checkout=OLD),
        BY_A,
        Holders(LIVE),
        KEEP,
    ),
    (
        "own issue, finished checkout run",
        MINE_OLD_CHECKOUT,
        BY_A,
        Holders(FINISHED),
        take_over(OLD),
    ),
    (
        "own issue, missing checkout run",
        MINE_GONE_CHECKOUT,
        BY_A,
        Holders(MISSING),
        take_over(GONE),
    ),
    (
        "own issue, another live checkout run",
        MINE_OLD_CHECKOUT,
        BY_A,
        Holders(LIVE),
        ownership_conflict(
            "only the checkout run can release the issue",
            MINE_OLD_CHECKOUT,
            actor_run_id=RUN,
            holder_live="true",
        ),
    ),
    (
        "another agent's issue",
        THEIRS_LOCKED,
        BY_A,
        Holders(LIVE, LIVE),
        ownership_conflict(
            "only the assignee can release the issue", THEIRS_LOCKED, actor_agent_id=A
        ),
    ),
    (
        "unassigned issue",
        issue(),
        BY_A,
        FREE,
        ownership_conflict("only the assignee can release the issue", issue(), actor_agent_id=A),
    ),
    ("board user, another agent's locked issue", THEIRS_LOCKED, None, Holders(LIVE, LIVE), KEEP),
]


@pytest.mark.parametrize(
    ("row", "run", "holders", "decision"),
    [pytest.param(*case[1:], id=case[0]) for case in RELEASE_CASES],
)
def test_release(
    row: IssueFacts, run: RunFacts | None, holders: Holders, decision: Decision
) -> None:
    assert decide(Action.RELEASE, row, None, run, holders) == decision


def not_yours(row: IssueFacts) -> Decision:
    return refused(
        PermissionDenied,
        "agent cannot change another agent's issue",
        "AGENT_MISMATCH",
        {"issue_id": row.id, "assignee_agent_id": row.assignee_agent_id or ""},
    )


def run_conflict(row: IssueFacts, holder: str) -> Decision:
    return ownership_conflict(
        "issue run ownership conflict",
        row,
        actor_agent_id=A,
        actor_run_id=RUN,
        holder_run_id=holder,
        holder_live="true",
    )


MINE_UNLOCKED_OTHER_EXECUTION = issue("in_progress", A, execution=OTHER)
WRITE_CASES = [
    ("unassigned issue", Action.WRITE, issue(), BY_A, FREE, KEEP),
    ("board user", Action.WRITE, THEIRS_LOCKED, None, Holders(LIVE, LIVE), KEEP),
    ("own todo issue", Action.WRITE, issue("todo", A, checkout=OLD), BY_A, Holders(LIVE), KEEP),
    ("own checkout run", Action.WRITE, OWNED, BY_A, Holders(LIVE, LIVE), KEEP),
    (
        "own checkout run, checkout only",
        Action.WRITE,
        OWNED_NO_EXECUTION,
        BY_A,
        Holders(LIVE),
        KEEP,
    ),
    ("own issue, no locks: taken over", Action.WRITE, MINE_UNLOCKED, BY_A, FREE, take_over(None)),
    (
        "own issue, the run's execution lock only: taken over",
        Action.WRITE,
        issue("in_progress", A, execution=RUN),
        BY_A,
        Holders(None, LIVE),
        take_over(None),
    ),
    (
        "own issue, finished checkout run: taken over",
        Action.WRITE,
        MINE_OLD_CHECKOUT,
        BY_A,
        Holders(FINISHED),
        take_over(OLD),
    ),
    (
        "own issue, missing checkout run: taken over",
        Action.APPEND,
        MINE_GONE_CHECKOUT,
        BY_A,
        Holders(MISSING),
        take_over(GONE),
    ),
    (
        "own issue, another live checkout run",
        Action.WRITE,
        MINE_OLD_CHECKOUT,
        BY_A,
        Holders(LIVE),
        run_conflict(MINE_OLD_CHECKOUT, OLD),
    ),
    (
        "own issue, another run's live execution lock",
        Action.WRITE,
        MINE_UNLOCKED_OTHER_EXECUTION,
        BY_A,
        Holders(None, LIVE),
        run_conflict(MINE_UNLOCKED_OTHER_EXECUTION, OTHER),
    ),
    (
        "own issue, stale checkout does not hand over a live execution lock",
        Action.WRITE,
        MINE_OLD_CHECKOUT_OTHER_EXECUTION,
        BY_A,
        Holders(FINISHED, LIVE),
        run_conflict(MINE_OLD_CHECKOUT_OTHER_EXECUTION, OTHER),
    ),
    (
        "another agent's issue in progress",
        Action.WRITE,
        THEIRS_LOCKED,
        BY_A,
        Holders(LIVE, LIVE),
        ownership_conflict(
            "issue is checked out by another agent",
            THEIRS_LOCKED,
            actor_agent_id=A,
            actor_run_id=RUN,
        ),
    ),
    ("another agent's todo issue", Action.WRITE, THEIRS_TODO, BY_A, FREE, not_yours(THEIRS_TODO)),
    (
        "another agent's issue, appending",
        Action.APPEND,
        THEIRS_LOCKED,
        BY_A,
        Holders(LIVE, LIVE),
        KEEP,
    ),
]


@pytest.mark.parametrize(
    ("action", "row", "run", "holders", "decision"),
    [pytest.param(*case[1:], id=case[0]) for case in WRITE_CASES],
)
def test_write(
    action: Action, row: IssueFacts, run: RunFacts | None, holders: Holders, decision: Decision
) -> None:
    assert decide(action, row, None, run, holders) == decision


@pytest.mark.parametrize(
    ("action", "row", "run", "holders"),
    [pytest.param(Action.RELEASE, *case[1:4], id=f"release: {case[0]}") for case in RELEASE_CASES]
    + [pytest.param(*case[1:5], id=f"write: {case[0]}") for case in WRITE_CASES],
)
def test_the_checkout_runs_status_is_needed_only_where_it_can_change_the_answer(
    action: Action, row: IssueFacts, run: RunFacts | None, holders: Holders
) -> None:
    first, *others = [
        decide(action, row, None, run, replace(holders, checkout=status))
        for status in (LIVE, FINISHED, QUEUED, MISSING)
    ]
    if not needs_checkout_status(action, row, run):
        assert all(answer == first for answer in others)
    assert needs_checkout_status(Action.CHECK_OUT, row, run)


def test_a_checkout_decision_needs_the_agent() -> None:
    with pytest.raises(ValueError, match="agent"):
        decide(Action.CHECK_OUT, issue(), None, BY_A, FREE, expected=TODO)


def test_refusals_raise_the_error_they_describe() -> None:
    wrong_company = decide(
        Action.CHECK_OUT, issue(), AgentFacts(A, "company-2", "idle"), BY_A, FREE, expected=TODO
    )
    assert wrong_company.refusal is not None
    error = wrong_company.refusal.exception()
    assert isinstance(error, InvalidArgument)
    assert (error.message, error.reason) == (
        "agent_id: the agent must belong to the issue's company",
        "INVALID_ARGUMENT",
    )
    assert error.violations == (
        FieldViolation("agent_id", "the agent must belong to the issue's company"),
    )
    lost = decide(Action.CHECK_OUT, THEIRS_TODO, AGENT_A, BY_A, FREE, expected=TODO)
    assert lost.refusal is not None
    error = lost.refusal.exception()
    assert isinstance(error, FailedPrecondition)
    assert (error.reason, error.metadata["conflict"]) == ("ISSUE_CHECKOUT_CONFLICT", "assignee")
