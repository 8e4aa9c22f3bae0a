"""The authorization matrix of the issue service: who may call what, and that a refused
call changes nothing (the issue row and the company's audit rows stay as they were)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text

from common.actor import ACTOR_HEADER, SIGNATURE_HEADER, Actor, ActorType, Role, sign_actor
from common.errors import PaperclipError
from issue_service.app import ISSUE_LOCK_SERVICE, ISSUE_SERVICE
from paperclip.issues.v1 import issue_locks_pb2, issues_pb2, issues_pb2_grpc
from tests.harness import (
    INTERNAL_KEY,
    Clients,
    Suite,
    admin,
    agent,
    board,
    expect_error,
    insert_run,
    new_agent,
    new_company,
    service,
)

TODO = issues_pb2.ISSUE_STATUS_TODO

# ---------------------------------------------------------------------------- fixtures


@dataclass
class Tenant:
    """One company with an agent, a live run of it, an issue and a comment."""

    company: issues_pb2.Company
    agent_id: str
    run_id: str
    issue: issues_pb2.Issue


@dataclass
class World:
    a: Tenant
    b: Tenant
    other_agent_id: str  # a second agent of company A


async def _tenant(suite: Suite, root: Clients, name: str) -> Tenant:
    company = await new_company(root, name)
    bot = await new_agent(root, company.id)
    run = await insert_run(suite.db, company_id=company.id, agent_id=bot.id)
    issue = await root.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=company.id, title=f"{name} issue", status=TODO)
    )
    await root.issues.AddComment(issues_pb2.AddCommentRequest(issue_id=issue.id, body="hello"))
    return Tenant(company, bot.id, run, issue)


@pytest.fixture
async def world(suite: Suite) -> AsyncIterator[World]:
    root = suite.clients(admin())
    a = await _tenant(suite, root, "Alpha")
    b = await _tenant(suite, root, "Bravo")
    other = await new_agent(root, a.company.id)
    yield World(a, b, other.id)


# ---------------------------------------------------------------------------- snapshot


async def _snapshot(suite: Suite, tenant: Tenant) -> dict[str, Any]:
    """Everything a refused call must leave alone for one tenant."""
    company = tenant.company.id
    async with suite.db.transaction() as conn:
        issue = (
            (
                await conn.execute(
                    text("SELECT * FROM issues.issues WHERE id = :id"), {"id": tenant.issue.id}
                )
            )
            .mappings()
            .one()
        )
        counts = {}
        for table in (
            "issues.issues",
            "issues.issue_comments",
            "issues.issue_events",
            "audit.activity_log",
        ):
            counts[table] = (
                await conn.execute(
                    text(f"SELECT count(*) FROM {table} WHERE company_id = :c"), {"c": company}
                )
            ).scalar_one()
        companies = (await conn.execute(text("SELECT count(*) FROM issues.companies"))).scalar()
    return {"issue": dict(issue), "counts": counts, "companies": companies}


async def _refused(
    suite: Suite,
    world: World,
    call: Callable[[], Awaitable[Any]],
    code: grpc.StatusCode,
    reason: str,
) -> PaperclipError:
    """Run ``call``; it must fail with ``code``/``reason`` and change nothing."""
    before = [await _snapshot(suite, world.a), await _snapshot(suite, world.b)]
    error = await expect_error(call())
    assert (error.code, error.reason) == (code, reason), (error.code, error.reason, error.message)
    after = [await _snapshot(suite, world.a), await _snapshot(suite, world.b)]
    assert after == before
    return error


def _raw_issues(
    suite: Suite,
) -> tuple[grpc.aio.Channel, issues_pb2_grpc.IssueServiceAsyncStub]:
    """A channel without the harness interceptor: metadata exactly as given."""
    channel = grpc.aio.insecure_channel(suite.issue_addr)
    return channel, issues_pb2_grpc.IssueServiceStub(channel)


# ---------------------------------------------------------------------------- authentication


def _encode(claims: dict[str, Any]) -> str:
    body = base64.urlsafe_b64encode(
        json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
    ).decode()
    return f"v1.{body}"


def _signed(payload: str, key: bytes = INTERNAL_KEY) -> tuple[tuple[str, str], ...]:
    """``payload`` with a valid signature (as if a buggy signer had produced it)."""
    mac = hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()
    return ((ACTOR_HEADER, payload), (SIGNATURE_HEADER, mac))


def _tampered(actor: Actor) -> tuple[tuple[str, str], ...]:
    """A genuine signed actor whose payload was then edited into an instance admin."""
    (_, payload), (_, signature) = sign_actor(actor, INTERNAL_KEY)
    body = payload.split(".", 1)[1]
    claims = json.loads(base64.urlsafe_b64decode(body.encode()))
    claims["is_instance_admin"] = True
    return ((ACTOR_HEADER, _encode(claims)), (SIGNATURE_HEADER, signature))


def _flipped_signature(actor: Actor) -> tuple[tuple[str, str], ...]:
    (_, payload), (_, signature) = sign_actor(actor, INTERNAL_KEY)
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    return ((ACTOR_HEADER, payload), (SIGNATURE_HEADER, flipped))


def _bad_metadata(case: str, company_id: str) -> tuple[tuple[str, str], ...]:
    member = board(company_id, Role.ADMIN)
    now = time.time()
    cases: dict[str, Callable[[], tuple[tuple[str, str], ...]]] = {
        "none": lambda: (),
        "forged_key": lambda: sign_actor(member, b"wrong"),
        "tampered_payload": lambda: _tampered(member),
        "flipped_signature": lambda: _flipped_signature(member),
        "expired": lambda: sign_actor(member, INTERNAL_KEY, now=now - 3600),
        "from_the_future": lambda: sign_actor(member, INTERNAL_KEY, now=now + 3600),
        "actor_without_signature": lambda: sign_actor(member, INTERNAL_KEY)[:1],
        "signature_without_actor": lambda: sign_actor(member, INTERNAL_KEY)[1:],
        "unknown_version": lambda: _signed(
            "v2." + sign_actor(member, INTERNAL_KEY)[0][1].split(".", 1)[1]
        ),
        "not_base64": lambda: _signed("v1.!!!not-base64!!!"),
        "not_json": lambda: _signed("v1." + base64.urlsafe_b64encode(b"not json").decode()),
        "claims_not_object": lambda: _signed("v1." + base64.urlsafe_b64encode(b"[1,2,3]").decode()),
        "claims_string": lambda: _signed("v1." + base64.urlsafe_b64encode(b'"board"').decode()),
        "iat_not_a_number": lambda: _signed(_encode({**member.to_claims(), "iat": "yesterday"})),
        "iat_infinite": lambda: _signed(
            "v1." + base64.urlsafe_b64encode(b'{"iat":1e400,"type":"board","user_id":"u"}').decode()
        ),
        "missing_iat": lambda: _signed(_encode(member.to_claims())),
        "unknown_actor_type": lambda: _signed(_encode({"type": "root", "iat": int(now)})),
        "agent_without_company": lambda: _signed(
            _encode({"type": "agent", "agent_id": "x", "iat": int(now)})
        ),
        "unknown_role": lambda: _signed(
            _encode(
                {
                    "type": "board",
                    "user_id": "u",
                    "memberships": {company_id: "owner"},
                    "iat": int(now),
                }
            )
        ),
    }
    return cases[case]()


AUTHN_CASES = [
    "none",
    "forged_key",
    "tampered_payload",
    "flipped_signature",
    "expired",
    "from_the_future",
    "actor_without_signature",
    "signature_without_actor",
    "unknown_version",
    "not_base64",
    "not_json",
    "claims_not_object",
    "claims_string",
    "iat_not_a_number",
    "iat_infinite",
    "missing_iat",
    "unknown_actor_type",
    "agent_without_company",
    "unknown_role",
]


@pytest.mark.parametrize("case", AUTHN_CASES)
async def test_unauthenticated_calls_are_refused(suite: Suite, world: World, case: str) -> None:
    metadata = _bad_metadata(case, world.a.company.id)
    channel, stub = _raw_issues(suite)
    try:
        await _refused(
            suite,
            world,
            lambda: stub.UpdateIssue(
                issues_pb2.UpdateIssueRequest(
                    issue=issues_pb2.Issue(id=world.a.issue.id, title="pwned"),
                    update_mask=field_mask_pb2.FieldMask(paths=["title"]),
                ),
                metadata=metadata,
            ),
            grpc.StatusCode.UNAUTHENTICATED,
            "UNAUTHENTICATED",
        )
        await _refused(
            suite,
            world,
            lambda: stub.CreateIssue(
                issues_pb2.CreateIssueRequest(company_id=world.a.company.id, title="pwned"),
                metadata=metadata,
            ),
            grpc.StatusCode.UNAUTHENTICATED,
            "UNAUTHENTICATED",
        )
        await _refused(
            suite,
            world,
            lambda: stub.GetIssue(
                issues_pb2.GetIssueRequest(issue=world.a.issue.id), metadata=metadata
            ),
            grpc.StatusCode.UNAUTHENTICATED,
            "UNAUTHENTICATED",
        )
    finally:
        await channel.close()


async def test_harness_forged_and_anonymous_clients_are_refused(suite: Suite, world: World) -> None:
    for clients in (suite.clients(None), suite.clients(admin(), key=b"wrong")):

        def create_issue(c: Clients = clients) -> Awaitable[issues_pb2.Issue]:
            return c.issues.CreateIssue(
                issues_pb2.CreateIssueRequest(company_id=world.a.company.id, title="pwned")
            )

        def release_run_locks(
            c: Clients = clients,
        ) -> Awaitable[issue_locks_pb2.ReleaseRunLocksResponse]:
            return c.locks.ReleaseRunLocks(
                issue_locks_pb2.ReleaseRunLocksRequest(run_id=world.a.run_id)
            )

        await _refused(
            suite, world, create_issue, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"
        )
        await _refused(
            suite, world, release_run_locks, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"
        )


async def test_valid_raw_signature_is_accepted(suite: Suite, world: World) -> None:
    """The raw-channel path itself works: the refusals above are about the metadata."""
    channel, stub = _raw_issues(suite)
    try:
        got = await stub.GetIssue(
            issues_pb2.GetIssueRequest(issue=world.a.issue.id),
            metadata=sign_actor(board(world.a.company.id, Role.VIEWER), INTERNAL_KEY),
        )
        assert got.id == world.a.issue.id
    finally:
        await channel.close()


async def test_health_check_needs_no_actor(suite: Suite) -> None:
    channel = grpc.aio.insecure_channel(suite.issue_addr)
    try:
        # grpc_health's stubs declare no methods on HealthStub, so type it loosely.
        stub: Any = health_pb2_grpc.HealthStub(channel)
        for name in ("", ISSUE_SERVICE, ISSUE_LOCK_SERVICE):
            response = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert response.status == health_pb2.HealthCheckResponse.SERVING, name
    finally:
        await channel.close()


# ---------------------------------------------------------------------------- company scope

Call = Callable[[Clients, World], Awaitable[Any]]


READS: dict[str, Call] = {
    "GetCompany": lambda c, w: c.issues.GetCompany(
        issues_pb2.GetCompanyRequest(company_id=w.b.company.id)
    ),
    "GetIssue": lambda c, w: c.issues.GetIssue(issues_pb2.GetIssueRequest(issue=w.b.issue.id)),
    "GetIssueByIdentifier": lambda c, w: c.issues.GetIssue(
        issues_pb2.GetIssueRequest(issue=w.b.issue.identifier)
    ),
    "ListIssues": lambda c, w: c.issues.ListIssues(
        issues_pb2.ListIssuesRequest(company_id=w.b.company.id)
    ),
    "ListComments": lambda c, w: c.issues.ListComments(
        issues_pb2.ListCommentsRequest(issue_id=w.b.issue.id)
    ),
    "ListActivity": lambda c, w: c.issues.ListActivity(
        issues_pb2.ListActivityRequest(company_id=w.b.company.id)
    ),
}

WRITES: dict[str, Call] = {
    "CreateIssue": lambda c, w: c.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=w.b.company.id, title="intruder")
    ),
    "UpdateIssue": lambda c, w: c.issues.UpdateIssue(
        issues_pb2.UpdateIssueRequest(
            issue=issues_pb2.Issue(id=w.b.issue.id, title="changed"),
            update_mask=field_mask_pb2.FieldMask(paths=["title"]),
        )
    ),
    "AddComment": lambda c, w: c.issues.AddComment(
        issues_pb2.AddCommentRequest(issue_id=w.b.issue.id, body="intruder")
    ),
    "ReleaseIssue": lambda c, w: c.issues.ReleaseIssue(
        issues_pb2.ReleaseIssueRequest(issue_id=w.b.issue.id)
    ),
}

BOARD_WRITES: dict[str, Call] = {
    **WRITES,
    "CheckoutIssue": lambda c, w: c.issues.CheckoutIssue(
        issues_pb2.CheckoutIssueRequest(
            issue_id=w.b.issue.id, agent_id=w.b.agent_id, expected_statuses=[TODO]
        )
    ),
    "ForceReleaseIssue": lambda c, w: c.issues.ForceReleaseIssue(
        issues_pb2.ForceReleaseIssueRequest(issue_id=w.b.issue.id, clear_assignee=True)
    ),
}

AGENT_WRITES: dict[str, Call] = {
    **WRITES,
    # The agent checks out as itself, but the issue belongs to another company.
    "CheckoutIssue": lambda c, w: c.issues.CheckoutIssue(
        issues_pb2.CheckoutIssueRequest(
            issue_id=w.b.issue.id, agent_id=w.a.agent_id, expected_statuses=[TODO]
        )
    ),
}


@pytest.mark.parametrize("rpc", sorted({**READS, **BOARD_WRITES}))
async def test_board_member_of_other_company_is_denied(
    suite: Suite, world: World, rpc: str
) -> None:
    member_of_a = suite.clients(board(world.a.company.id, Role.ADMIN, user_id="alice"))
    call = {**READS, **BOARD_WRITES}[rpc]
    await _refused(
        suite,
        world,
        lambda: call(member_of_a, world),
        grpc.StatusCode.PERMISSION_DENIED,
        "COMPANY_ACCESS_DENIED",
    )


@pytest.mark.parametrize("rpc", sorted({**READS, **AGENT_WRITES}))
async def test_agent_of_other_company_is_denied(suite: Suite, world: World, rpc: str) -> None:
    agent_of_a = suite.clients(agent(world.a.agent_id, world.a.company.id, world.a.run_id))
    call = {**READS, **AGENT_WRITES}[rpc]
    await _refused(
        suite,
        world,
        lambda: call(agent_of_a, world),
        grpc.StatusCode.PERMISSION_DENIED,
        "COMPANY_ACCESS_DENIED",
    )


VIEWER_WRITES: dict[str, Call] = {
    "CreateIssue": lambda c, w: c.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=w.b.company.id, title="viewer")
    ),
    "UpdateIssue": lambda c, w: c.issues.UpdateIssue(
        issues_pb2.UpdateIssueRequest(
            issue=issues_pb2.Issue(id=w.b.issue.id, title="changed"),
            update_mask=field_mask_pb2.FieldMask(paths=["title"]),
        )
    ),
    "AddComment": lambda c, w: c.issues.AddComment(
        issues_pb2.AddCommentRequest(issue_id=w.b.issue.id, body="viewer")
    ),
    "CheckoutIssue": BOARD_WRITES["CheckoutIssue"],
    "ReleaseIssue": WRITES["ReleaseIssue"],
    "ForceReleaseIssue": BOARD_WRITES["ForceReleaseIssue"],
}


@pytest.mark.parametrize("rpc", sorted(VIEWER_WRITES))
async def test_viewer_cannot_write(suite: Suite, world: World, rpc: str) -> None:
    viewer = suite.clients(board(world.b.company.id, Role.VIEWER, user_id="vic"))
    await _refused(
        suite,
        world,
        lambda: VIEWER_WRITES[rpc](viewer, world),
        grpc.StatusCode.PERMISSION_DENIED,
        "COMPANY_ACCESS_DENIED",
    )


async def test_viewer_can_read(suite: Suite, world: World) -> None:
    viewer = suite.clients(board(world.b.company.id, Role.VIEWER, user_id="vic"))
    before = await _snapshot(suite, world.b)
    company = await viewer.issues.GetCompany(
        issues_pb2.GetCompanyRequest(company_id=world.b.company.id)
    )
    assert company.id == world.b.company.id
    by_id = await viewer.issues.GetIssue(issues_pb2.GetIssueRequest(issue=world.b.issue.id))
    by_identifier = await viewer.issues.GetIssue(
        issues_pb2.GetIssueRequest(issue=world.b.issue.identifier)
    )
    assert by_id.id == by_identifier.id == world.b.issue.id
    listed = await viewer.issues.ListIssues(
        issues_pb2.ListIssuesRequest(company_id=world.b.company.id)
    )
    assert [i.id for i in listed.issues] == [world.b.issue.id]
    comments = await viewer.issues.ListComments(
        issues_pb2.ListCommentsRequest(issue_id=world.b.issue.id)
    )
    assert [c.body for c in comments.comments] == ["hello"]
    activity = await viewer.issues.ListActivity(
        issues_pb2.ListActivityRequest(company_id=world.b.company.id)
    )
    assert {"issue.created", "issue.comment_added"} <= {e.action for e in activity.entries}
    companies = await viewer.issues.ListCompanies(issues_pb2.ListCompaniesRequest())
    assert [c.id for c in companies.companies] == [world.b.company.id]
    assert await _snapshot(suite, world.b) == before


async def test_member_write_works(suite: Suite, world: World) -> None:
    """The same writes the viewer is refused succeed for a member (the matrix is real)."""
    member = suite.clients(board(world.b.company.id, Role.MEMBER, user_id="mia"))
    created = await VIEWER_WRITES["CreateIssue"](member, world)
    assert created.company_id == world.b.company.id
    updated = await VIEWER_WRITES["UpdateIssue"](member, world)
    assert updated.title == "changed"
    comment = await VIEWER_WRITES["AddComment"](member, world)
    assert comment.author_user_id == "mia"


# ---------------------------------------------------------------------------- agents


async def test_agent_cannot_check_out_as_another_agent(suite: Suite, world: World) -> None:
    me = suite.clients(agent(world.a.agent_id, world.a.company.id, world.a.run_id))
    await _refused(
        suite,
        world,
        lambda: me.issues.CheckoutIssue(
            issues_pb2.CheckoutIssueRequest(
                issue_id=world.a.issue.id, agent_id=world.other_agent_id, expected_statuses=[TODO]
            )
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "AGENT_MISMATCH",
    )


AGENT_RUN_WRITES: dict[str, Call] = {
    "CheckoutIssue": lambda c, w: c.issues.CheckoutIssue(
        issues_pb2.CheckoutIssueRequest(
            issue_id=w.a.issue.id, agent_id=w.a.agent_id, expected_statuses=[TODO]
        )
    ),
    "CreateIssue": lambda c, w: c.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=w.a.company.id, title="no run")
    ),
    "UpdateIssue": lambda c, w: c.issues.UpdateIssue(
        issues_pb2.UpdateIssueRequest(
            issue=issues_pb2.Issue(id=w.a.issue.id, title="changed"),
            update_mask=field_mask_pb2.FieldMask(paths=["title"]),
        )
    ),
    "AddComment": lambda c, w: c.issues.AddComment(
        issues_pb2.AddCommentRequest(issue_id=w.a.issue.id, body="no run")
    ),
    "ReleaseIssue": lambda c, w: c.issues.ReleaseIssue(
        issues_pb2.ReleaseIssueRequest(issue_id=w.a.issue.id)
    ),
}


@pytest.mark.parametrize("rpc", sorted(AGENT_RUN_WRITES))
async def test_agent_without_run_is_refused(suite: Suite, world: World, rpc: str) -> None:
    runless = suite.clients(agent(world.a.agent_id, world.a.company.id, None))
    await _refused(
        suite,
        world,
        lambda: AGENT_RUN_WRITES[rpc](runless, world),
        grpc.StatusCode.UNAUTHENTICATED,
        "AGENT_RUN_REQUIRED",
    )


# ---------------------------------------------------------------------------- board only


async def test_force_release_by_agent_requires_board(suite: Suite, world: World) -> None:
    me = suite.clients(agent(world.a.agent_id, world.a.company.id, world.a.run_id))
    held = await me.issues.CheckoutIssue(
        issues_pb2.CheckoutIssueRequest(
            issue_id=world.a.issue.id, agent_id=world.a.agent_id, expected_statuses=[TODO]
        )
    )
    assert held.checkout_run_id == world.a.run_id
    await _refused(
        suite,
        world,
        lambda: me.issues.ForceReleaseIssue(
            issues_pb2.ForceReleaseIssueRequest(issue_id=world.a.issue.id, clear_assignee=True)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "BOARD_REQUIRED",
    )


@pytest.mark.parametrize("role", list(Role))
async def test_create_company_requires_instance_admin(
    suite: Suite, world: World, role: Role
) -> None:
    member = suite.clients(board(world.a.company.id, role, user_id="bob"))
    await _refused(
        suite,
        world,
        lambda: member.issues.CreateCompany(
            issues_pb2.CreateCompanyRequest(name="Sneaky", issue_prefix="SNEAKY")
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "BOARD_REQUIRED",
    )


async def test_create_company_by_agent_requires_board(suite: Suite, world: World) -> None:
    me = suite.clients(agent(world.a.agent_id, world.a.company.id, world.a.run_id))
    await _refused(
        suite,
        world,
        lambda: me.issues.CreateCompany(
            issues_pb2.CreateCompanyRequest(name="Sneaky", issue_prefix="SNEAKY")
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "BOARD_REQUIRED",
    )


async def test_interrupt_comment_by_agent_requires_board(suite: Suite, world: World) -> None:
    me = suite.clients(agent(world.a.agent_id, world.a.company.id, world.a.run_id))
    await _refused(
        suite,
        world,
        lambda: me.issues.AddComment(
            issues_pb2.AddCommentRequest(issue_id=world.a.issue.id, body="stop", interrupt=True)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "BOARD_REQUIRED",
    )


# ---------------------------------------------------------------------------- internal service

LOCK_CALLS: dict[str, Call] = {
    "AcquireExecutionLock": lambda c, w: c.locks.AcquireExecutionLock(
        issue_locks_pb2.AcquireExecutionLockRequest(
            issue_id=w.a.issue.id, run_id=w.a.run_id, agent_id=w.a.agent_id
        )
    ),
    "TransferExecutionLock": lambda c, w: c.locks.TransferExecutionLock(
        issue_locks_pb2.TransferExecutionLockRequest(
            issue_id=w.a.issue.id, from_run_id=w.a.run_id, to_run_id=w.a.run_id
        )
    ),
    "ReleaseRunLocks": lambda c, w: c.locks.ReleaseRunLocks(
        issue_locks_pb2.ReleaseRunLocksRequest(run_id=w.a.run_id)
    ),
    "ClearExecutionRunIfTerminal": lambda c, w: c.locks.ClearExecutionRunIfTerminal(
        issue_locks_pb2.ClearExecutionRunIfTerminalRequest(issue_id=w.a.issue.id)
    ),
    "EscalateStrandedIssue": lambda c, w: c.locks.EscalateStrandedIssue(
        issue_locks_pb2.EscalateStrandedIssueRequest(issue_id=w.a.issue.id, body="stuck")
    ),
}


def _lock_callers(w: World) -> dict[str, Actor]:
    return {
        "instance_admin": admin(),
        "board_admin": board(w.a.company.id, Role.ADMIN),
        "agent": agent(w.a.agent_id, w.a.company.id, w.a.run_id),
    }


@pytest.mark.parametrize("caller", ["instance_admin", "board_admin", "agent"])
@pytest.mark.parametrize("rpc", sorted(LOCK_CALLS))
async def test_lock_service_requires_service_actor(
    suite: Suite, world: World, rpc: str, caller: str
) -> None:
    clients = suite.clients(_lock_callers(world)[caller])
    await _refused(
        suite,
        world,
        lambda: LOCK_CALLS[rpc](clients, world),
        grpc.StatusCode.PERMISSION_DENIED,
        "SERVICE_REQUIRED",
    )


async def test_lock_service_accepts_service_actor(suite: Suite, world: World) -> None:
    internal = suite.clients(service())
    acquired = await LOCK_CALLS["AcquireExecutionLock"](internal, world)
    assert acquired.issue.execution_run_id == world.a.run_id
    cleared = await LOCK_CALLS["ClearExecutionRunIfTerminal"](internal, world)
    assert cleared.cleared is False


async def test_system_actor_type_counts_as_service(suite: Suite, world: World) -> None:
    internal = suite.clients(Actor(type=ActorType.SYSTEM))
    cleared = await LOCK_CALLS["ClearExecutionRunIfTerminal"](internal, world)
    assert cleared.cleared is False
