"""The fused fast-path statements against ``ownership.decide``, in PostgreSQL.

For every situation of a table (the issue's status, assignee, checkout and execution
runs, blockers, the agent checked out for, the caller's run, the expected statuses),
the issue is put in that state and the fast checkout statement run on it, each in a
savepoint rolled back afterwards. It must apply its change exactly when ``decide``, asked
about the locked row it read, answers TAKE and the row's execution run is not stale. The
fast release statement, which leaves the assignee test to ``decide`` on the locked row,
must apply exactly when the execution run is not stale and ``decide`` would answer KEEP
were the caller the assignee.
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace

from common.sql import Tx
from issue_service import store
from issue_service.checkout_store import lock_and_check_out, lock_and_release
from issue_service.model import run_is_stale
from issue_service.ownership import Action, AgentFacts, RunFacts, Verdict, decide
from issue_service.ownership_gate import holders, issue_facts
from tests.harness import Suite, admin, new_agent, new_company
from tests.issue_service.support import World, make_world

_SET_STATE = """
    UPDATE issues.issues
    SET status = $2, assignee_agent_id = $3,
        assignee_user_id = CASE WHEN $2 = 'in_progress' AND $3::uuid IS NULL
                                THEN 'board-user' END,
        checkout_run_id = $4, execution_run_id = $5,
        execution_locked_at = CASE WHEN $5::uuid IS NULL THEN NULL ELSE now() END
    WHERE id = $1
"""
_BLOCK = "INSERT INTO issues.issue_blockers (issue_id, blocker_issue_id) VALUES ($1, $2)"
_TERMINATE = "UPDATE runs.agents SET status = 'terminated' WHERE id = $1"


@dataclass(frozen=True)
class Outcome:
    """Whether a fast statement applied, and how it differed from ``decide`` (None: not)."""

    applied: bool
    difference: str | None


class _Rollback(Exception):
    """Ends a situation's savepoint."""


@dataclass(frozen=True)
class Situation:
    status: str
    assignee: str | None
    checkout: str | None
    execution: str | None
    blocked: bool
    agent: str
    run: str | None
    expected: tuple[str, ...]


@dataclass(frozen=True)
class Cast:
    """The agents and runs the situations are made of."""

    world: World
    issue: str
    blocker: str
    #: The agent checked out for, its current run, an earlier finished run and another
    #: live run of it; a run of another agent; a run id with no row.
    agent: str
    run: str
    finished: str
    live: str
    other_run: str
    gone: str
    foreign_agent: str
    terminated_agent: str
    missing_agent: str


async def _cast(suite: Suite) -> Cast:
    w = await make_world(suite)
    board = suite.clients(admin())
    elsewhere = await new_company(board)
    foreign = await new_agent(board, elsewhere.id)
    async with suite.db.unit_of_work() as tx:
        await tx.conn.execute(_TERMINATE, w.c)
    return Cast(
        world=w,
        issue=await w.issue(),
        blocker=await w.issue(title="Blocker"),
        agent=w.a,
        run=await w.run(w.a),
        finished=await w.run(w.a, "succeeded"),
        live=await w.run(w.a),
        other_run=await w.run(w.b),
        gone=str(uuid.uuid4()),
        foreign_agent=foreign.id,
        terminated_agent=w.c,
        missing_agent=str(uuid.uuid4()),
    )


def _situations(c: Cast) -> Iterator[Situation]:
    runs = (None, c.run, c.finished, c.live, c.other_run, c.gone)
    for status, assignee, checkout, execution, run, expected in itertools.product(
        ("todo", "in_progress", "done"),
        (None, c.agent, c.world.b),
        runs,
        runs,
        (c.run, None),
        (("todo",), ("todo", "in_progress")),
    ):
        yield Situation(status, assignee, checkout, execution, False, c.agent, run, expected)
    agents = (c.agent, c.foreign_agent, c.terminated_agent, c.missing_agent)
    for agent, blocked, status, assignee, checkout, execution in itertools.product(
        agents,
        (False, True),
        ("todo", "in_progress"),
        (None, c.world.b),
        (None, c.run),
        (None, c.run),
    ):
        yield Situation(
            status, assignee, checkout, execution, blocked, agent, c.run, ("todo", "in_progress")
        )


async def _set_up(tx: Tx, c: Cast, s: Situation) -> None:
    await tx.conn.execute(_SET_STATE, c.issue, s.status, s.assignee, s.checkout, s.execution)
    if s.blocked:
        await tx.conn.execute(_BLOCK, c.issue, c.blocker)


async def _check_out_agrees(tx: Tx, c: Cast, s: Situation) -> Outcome:
    """Whether the fast checkout statement applied; what differs from ``decide``."""
    locked = await lock_and_check_out(
        tx, issue_id=c.issue, agent_id=s.agent, run_id=s.run, expected=list(s.expected)
    )
    assert locked is not None
    row = locked.row
    info = store.agent_of_checkout_row(row, s.agent)
    agent = AgentFacts(s.agent, info.company_id if info else None, info.status if info else None)
    facts = issue_facts(row, open_blockers=[str(b) for b in row["open_blockers"]])
    run = RunFacts(s.agent, s.run) if s.run else None
    locks = await holders(tx, row, Action.CHECK_OUT, run, facts)
    decision = decide(Action.CHECK_OUT, facts, agent, run, locks, expected=s.expected)
    stale = facts.execution_run_id is not None and run_is_stale(row["execution_run_status"])
    if (locked.changed is not None) != (decision.verdict is Verdict.TAKE and not stale):
        return Outcome(False, f"checkout {s}: fast {locked.changed is not None}, {decision}")
    if locked.changed is None:
        return Outcome(False, None)
    changed = issue_facts(locked.changed)
    taken = (changed.status, changed.assignee_agent_id, changed.checkout_run_id)
    if taken != ("in_progress", s.agent, s.run) or changed.execution_run_id != s.run:
        return Outcome(True, f"checkout {s}: changed to {changed}")
    return Outcome(True, None)


async def _release_agrees(tx: Tx, c: Cast, s: Situation) -> Outcome:
    """Whether the fast release statement applied; what differs from ``decide``."""
    locked = await lock_and_release(tx, issue_id=c.issue, actor_run_id=s.run)
    assert locked is not None
    row = locked.row
    facts = issue_facts(row)
    run = RunFacts(s.agent, s.run) if s.run else None
    locks = await holders(tx, row, Action.RELEASE, run, facts)
    decision = decide(Action.RELEASE, facts, None, run, locks)
    stale = facts.execution_run_id is not None and run_is_stale(row["execution_run_status"])
    # The statement leaves the assignee test to ``decide`` on the locked row.
    as_assignee = replace(facts, assignee_agent_id=s.agent) if run else facts
    admitted = decide(Action.RELEASE, as_assignee, None, run, locks).verdict is Verdict.KEEP
    if (locked.changed is not None) != (admitted and not stale):
        return Outcome(False, f"release {s}: fast {locked.changed is not None}, {decision}")
    return Outcome(locked.changed is not None, None)


async def test_fast_paths_apply_exactly_where_decide_lets_them(suite: Suite) -> None:
    c = await _cast(suite)
    outcomes: list[tuple[str, Outcome]] = []
    async with suite.db.unit_of_work() as tx:
        for s in _situations(c):
            for check in (_check_out_agrees, _release_agrees):
                with contextlib.suppress(_Rollback):
                    async with tx.conn.transaction():
                        await _set_up(tx, c, s)
                        outcomes.append((check.__name__, await check(tx, c, s)))
                        raise _Rollback
    assert len(outcomes) > 2000
    assert [o.difference for _, o in outcomes if o.difference is not None] == []
    # Both statements both applied and fell to the slow path somewhere in the table.
    assert {(name, o.applied) for name, o in outcomes} == {
        (check, applied)
        for check in ("_check_out_agrees", "_release_agrees")
        for applied in (True, False)
    }
