"""Authentication and authorization through the gateway: every refused caller gets its
code and reason (never NOT_FOUND or INTERNAL) and changes nothing; a client-supplied
actor header is ignored; WhoAmI, CreateApiKey and RevokeApiKey."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import field_mask_pb2

from common.actor import Actor, ActorType, Role, sign_actor
from common.errors import PaperclipError
from common.run_tokens import mint_run_token
from gateway import keys
from paperclip.gateway.v1 import auth_pb2
from paperclip.issues.v1 import issue_locks_pb2, issues_pb2
from paperclip.runs.v1 import agents_pb2
from tests.gateway.conftest import Caller, GatewayEnv, World, bearer, row_counts
from tests.harness import INTERNAL_KEY, delete_run, expect_error, fetch_value, set_run_status

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED
#: How long a NOTIFY may take to evict a cached authentication.
EVICTION_S = 2.0

Probe = Callable[[Caller, World], Awaitable[Any]]


def _todo() -> list[issues_pb2.IssueStatus.ValueType]:
    return [issues_pb2.ISSUE_STATUS_TODO, issues_pb2.ISSUE_STATUS_BACKLOG]


#: Calls that read or change company A, its issue and agents, and the auth service.
PROBES: dict[str, Probe] = {
    "WhoAmI": lambda c, w: c.auth.WhoAmI(auth_pb2.WhoAmIRequest()),
    "GetCompany": lambda c, w: c.issues.GetCompany(
        issues_pb2.GetCompanyRequest(company_id=w.company_a)
    ),
    "ListIssues": lambda c, w: c.issues.ListIssues(
        issues_pb2.ListIssuesRequest(company_id=w.company_a)
    ),
    "GetIssue": lambda c, w: c.issues.GetIssue(issues_pb2.GetIssueRequest(issue=w.issue_a.id)),
    "GetAgent": lambda c, w: c.runs.GetAgent(agents_pb2.GetAgentRequest(agent_id=w.agent_a)),
    "CreateCompany": lambda c, w: c.issues.CreateCompany(
        issues_pb2.CreateCompanyRequest(name="Intruder Inc")
    ),
    "CreateIssue": lambda c, w: c.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=w.company_a, title="intruder")
    ),
    "UpdateIssue": lambda c, w: c.issues.UpdateIssue(
        issues_pb2.UpdateIssueRequest(
            issue=issues_pb2.Issue(id=w.issue_a.id, title="renamed by intruder"),
            update_mask=field_mask_pb2.FieldMask(paths=["title"]),
        )
    ),
    "AddComment": lambda c, w: c.issues.AddComment(
        issues_pb2.AddCommentRequest(issue_id=w.issue_a.id, body="intruder")
    ),
    "CheckoutIssue": lambda c, w: c.issues.CheckoutIssue(
        issues_pb2.CheckoutIssueRequest(
            issue_id=w.issue_a.id, agent_id=w.agent_a, expected_statuses=_todo()
        )
    ),
    "CreateAgent": lambda c, w: c.runs.CreateAgent(
        agents_pb2.CreateAgentRequest(
            company_id=w.company_a,
            name=f"intruder-{uuid.uuid4().hex[:6]}",
            role="engineer",
            adapter_type="process",
            adapter_config=agents_pb2.AdapterConfig(command=["true"]),
        )
    ),
    "CreateApiKey": lambda c, w: c.auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(user_id="intruder", is_instance_admin=True)
    ),
    "RevokeApiKey": lambda c, w: c.auth.RevokeApiKey(
        auth_pb2.RevokeApiKeyRequest(api_key_id=w.member_a.api_key.id)
    ),
}
WRITES = ("CreateIssue", "UpdateIssue", "AddComment", "CheckoutIssue", "CreateAgent")


async def assert_refused(
    caller: Caller,
    world: World,
    probes: Sequence[str],
    code: grpc.StatusCode,
    reason: str,
) -> list[PaperclipError]:
    """Each probe fails with ``code`` and ``reason``."""
    errors = []
    for name in probes:
        error = await expect_error(PROBES[name](caller, world))
        assert (name, error.code, error.reason) == (name, code, reason), error.message
        errors.append(error)
    return errors


async def assert_unchanged(gw: GatewayEnv, world: World, before: dict[str, int]) -> None:
    """No row was added anywhere, and issue A is as it was created."""
    assert await row_counts(gw.db, world) == before
    issue = await gw.admin.issues.GetIssue(issues_pb2.GetIssueRequest(issue=world.issue_a.id))
    assert (issue.title, issue.status, issue.checkout_run_id) == (
        world.issue_a.title,
        world.issue_a.status,
        "",
    )


# -- refused tokens ---------------------------------------------------------------------


@dataclass(frozen=True)
class BadCredential:
    """How to build the refused metadata, and the reason it must be refused with."""

    metadata: Callable[[GatewayEnv, World], Awaitable[tuple[tuple[str, str], ...]]]
    reason: str


def _header(value: str) -> Callable[[GatewayEnv, World], Awaitable[tuple[tuple[str, str], ...]]]:
    async def build(gw: GatewayEnv, world: World) -> tuple[tuple[str, str], ...]:
        return (("authorization", value),)

    return build


async def _nothing(gw: GatewayEnv, world: World) -> tuple[tuple[str, str], ...]:
    return ()


async def _forged_jwt(gw: GatewayEnv, world: World) -> tuple[tuple[str, str], ...]:
    run_id, _ = await gw.run_token(world.company_a, world.agent_a)
    token = mint_run_token(
        b"not-the-gateway-secret-0123456789abcdef",
        agent_id=world.agent_a,
        company_id=world.company_a,
        run_id=run_id,
    )
    return bearer(token)


async def _unsigned_jwt(gw: GatewayEnv, world: World) -> tuple[tuple[str, str], ...]:
    run_id, _ = await gw.run_token(world.company_a, world.agent_a)
    now = int(time.time())
    claims = {
        "sub": world.agent_a,
        "company_id": world.company_a,
        "run_id": run_id,
        "iat": now,
        "exp": now + 3600,
        "iss": "paperclip",
    }
    return bearer(jwt.encode(claims, None, algorithm="none"))


async def _never_issued_key(gw: GatewayEnv, world: World) -> tuple[tuple[str, str], ...]:
    return bearer(keys.new_key())


async def _expired(gw: GatewayEnv, world: World) -> tuple[tuple[str, str], ...]:
    run_id, _ = await gw.run_token(world.company_a, world.agent_a)
    token = mint_run_token(
        gw.jwt_secret,
        agent_id=world.agent_a,
        company_id=world.company_a,
        run_id=run_id,
        now=time.time() - 7 * 24 * 3600,
        ttl_seconds=60,
    )
    return bearer(token)


async def _revoked_key(gw: GatewayEnv, world: World) -> tuple[tuple[str, str], ...]:
    created = await gw.new_key(f"revoked-{uuid.uuid4().hex[:8]}", {world.company_a: Role.ADMIN})
    await gw.admin.auth.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(api_key_id=created.api_key.id))
    return bearer(created.token)


async def _terminal_run(gw: GatewayEnv, world: World) -> tuple[tuple[str, str], ...]:
    _, token = await gw.run_token(world.company_a, world.agent_a, status="succeeded")
    return bearer(token)


async def _unknown_run(gw: GatewayEnv, world: World) -> tuple[tuple[str, str], ...]:
    token = mint_run_token(
        gw.jwt_secret,
        agent_id=world.agent_a,
        company_id=world.company_a,
        run_id=str(uuid.uuid4()),
    )
    return bearer(token)


async def _other_agents_run(gw: GatewayEnv, world: World) -> tuple[tuple[str, str], ...]:
    """A validly signed token naming agent a2 for a run of agent a."""
    run_id, _ = await gw.run_token(world.company_a, world.agent_a)
    token = mint_run_token(
        gw.jwt_secret, agent_id=world.agent_a2, company_id=world.company_a, run_id=run_id
    )
    return bearer(token)


async def _other_companys_claim(gw: GatewayEnv, world: World) -> tuple[tuple[str, str], ...]:
    """A validly signed token claiming company B for a run in company A."""
    run_id, _ = await gw.run_token(world.company_a, world.agent_a)
    token = mint_run_token(
        gw.jwt_secret, agent_id=world.agent_a, company_id=world.company_b, run_id=run_id
    )
    return bearer(token)


async def _malformed_run_id(gw: GatewayEnv, world: World) -> tuple[tuple[str, str], ...]:
    """Signed with the right key, yet its run is no id (the database must not see it)."""
    token = mint_run_token(
        gw.jwt_secret, agent_id=world.agent_a, company_id=world.company_a, run_id="run-1"
    )
    return bearer(token)


BAD_CREDENTIALS: dict[str, BadCredential] = {
    "missing": BadCredential(_nothing, "UNAUTHENTICATED"),
    "basic-scheme": BadCredential(_header("Basic x"), "UNAUTHENTICATED"),
    "bearer-without-token": BadCredential(_header("Bearer"), "UNAUTHENTICATED"),
    "no-scheme": BadCredential(_header("garbage"), "UNAUTHENTICATED"),
    "bearer-garbage": BadCredential(_header("Bearer garbage"), "UNAUTHENTICATED"),
    "jwt-shaped-garbage": BadCredential(_header("Bearer a.b.c"), "UNAUTHENTICATED"),
    "key-prefix-garbage": BadCredential(_header("Bearer pcb_"), "UNAUTHENTICATED"),
    "jwt-other-secret": BadCredential(_forged_jwt, "UNAUTHENTICATED"),
    "jwt-alg-none": BadCredential(_unsigned_jwt, "UNAUTHENTICATED"),
    "key-never-issued": BadCredential(_never_issued_key, "UNAUTHENTICATED"),
    "jwt-expired": BadCredential(_expired, "RUN_TOKEN_EXPIRED"),
    "key-revoked": BadCredential(_revoked_key, "API_KEY_REVOKED"),
    "jwt-terminal-run": BadCredential(_terminal_run, "RUN_TOKEN_REVOKED"),
    "jwt-unknown-run": BadCredential(_unknown_run, "RUN_TOKEN_REVOKED"),
    "jwt-agent-not-of-run": BadCredential(_other_agents_run, "UNAUTHENTICATED"),
    "jwt-company-not-of-run": BadCredential(_other_companys_claim, "UNAUTHENTICATED"),
    "jwt-run-not-an-id": BadCredential(_malformed_run_id, "UNAUTHENTICATED"),
}


@pytest.mark.parametrize("case", list(BAD_CREDENTIALS))
async def test_bad_credentials_are_unauthenticated_and_change_nothing(
    gw: GatewayEnv, world: World, case: str
) -> None:
    bad = BAD_CREDENTIALS[case]
    caller = gw.raw_caller(await bad.metadata(gw, world))
    before = await row_counts(gw.db, world)

    errors = await assert_refused(caller, world, list(PROBES), UNAUTHENTICATED, bad.reason)

    await assert_unchanged(gw, world, before)
    # The refusal is a project error (ErrorInfo in domain paperclip), not a bare status.
    assert all(error.message for error in errors)


async def test_token_of_a_run_that_ends_is_refused_within_moments(
    gw: GatewayEnv, world: World
) -> None:
    for status in ("succeeded", "failed", "cancelled", "timed_out"):
        run_id, token = await gw.run_token(world.company_a, world.agent_a)
        caller = gw.caller(token)
        # Authenticated (and so cached) while the run lives.
        me = await caller.auth.WhoAmI(auth_pb2.WhoAmIRequest())
        assert me.run_id == run_id
        await caller.issues.GetCompany(issues_pb2.GetCompanyRequest(company_id=world.company_a))

        await set_run_status(gw.db, run_id, status)
        error = await _refused_within(caller, EVICTION_S)

        assert (error.code, error.reason) == (UNAUTHENTICATED, "RUN_TOKEN_REVOKED"), status
        assert error.metadata == {"run_id": run_id, "run_status": status}
        before = await row_counts(gw.db, world)
        await assert_refused(caller, world, WRITES, UNAUTHENTICATED, "RUN_TOKEN_REVOKED")
        await assert_unchanged(gw, world, before)


async def test_token_of_a_deleted_run_is_refused(gw: GatewayEnv, world: World) -> None:
    run_id, token = await gw.run_token(world.company_a, world.agent_a)
    caller = gw.caller(token)
    await caller.auth.WhoAmI(auth_pb2.WhoAmIRequest())

    await delete_run(gw.db, run_id)

    error = await _refused_within(caller, EVICTION_S)
    assert (error.code, error.reason) == (UNAUTHENTICATED, "RUN_TOKEN_REVOKED")


async def test_revoked_key_is_refused_within_moments(gw: GatewayEnv, world: World) -> None:
    created = await gw.new_key(
        f"soon-revoked-{uuid.uuid4().hex[:8]}", {world.company_a: Role.ADMIN}
    )
    caller = gw.caller(created.token)
    await caller.issues.GetCompany(issues_pb2.GetCompanyRequest(company_id=world.company_a))

    revoked = await gw.admin.auth.RevokeApiKey(
        auth_pb2.RevokeApiKeyRequest(api_key_id=created.api_key.id)
    )
    assert revoked.HasField("revoked_at")

    error = await _refused_within(caller, EVICTION_S)
    assert (error.code, error.reason) == (UNAUTHENTICATED, "API_KEY_REVOKED")
    assert error.metadata == {"api_key_id": created.api_key.id}
    before = await row_counts(gw.db, world)
    await assert_refused(caller, world, WRITES, UNAUTHENTICATED, "API_KEY_REVOKED")
    await assert_unchanged(gw, world, before)


async def _refused_within(caller: Caller, seconds: float) -> PaperclipError:
    """Poll WhoAmI until it fails (a NOTIFY evicts the cached caller)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            await caller.auth.WhoAmI(auth_pb2.WhoAmIRequest())
        except grpc.aio.AioRpcError:
            return await expect_error(caller.auth.WhoAmI(auth_pb2.WhoAmIRequest()))
        if time.monotonic() > deadline:
            raise AssertionError(f"still accepted {seconds} s after revocation")
        await asyncio.sleep(0.05)


# -- authenticated but not allowed ------------------------------------------------------


async def test_viewer_reads_but_cannot_write(gw: GatewayEnv, world: World) -> None:
    viewer = gw.caller(world.viewer_a.token)
    for read in ("GetCompany", "ListIssues", "GetIssue", "GetAgent"):
        await PROBES[read](viewer, world)
    before = await row_counts(gw.db, world)

    errors = await assert_refused(viewer, world, WRITES, PERMISSION_DENIED, "COMPANY_ACCESS_DENIED")
    await assert_refused(
        viewer,
        world,
        ("CreateCompany", "CreateApiKey", "RevokeApiKey"),
        PERMISSION_DENIED,
        "BOARD_REQUIRED",
    )

    await assert_unchanged(gw, world, before)
    assert errors[0].metadata == {"company_id": world.company_a, "role": "viewer"}


async def _touch_company_b(caller: Caller, world: World) -> list[PaperclipError]:
    """Reads and writes of company B's data; every one must be refused."""
    calls: list[Awaitable[Any]] = [
        caller.issues.GetCompany(issues_pb2.GetCompanyRequest(company_id=world.company_b)),
        caller.issues.ListIssues(issues_pb2.ListIssuesRequest(company_id=world.company_b)),
        caller.issues.GetIssue(issues_pb2.GetIssueRequest(issue=world.issue_b.id)),
        caller.issues.GetIssue(issues_pb2.GetIssueRequest(issue=world.issue_b.identifier)),
        caller.issues.CreateIssue(
            issues_pb2.CreateIssueRequest(company_id=world.company_b, title="intruder")
        ),
        caller.issues.UpdateIssue(
            issues_pb2.UpdateIssueRequest(
                issue=issues_pb2.Issue(id=world.issue_b.id, title="renamed by intruder"),
                update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            )
        ),
        caller.issues.AddComment(
            issues_pb2.AddCommentRequest(issue_id=world.issue_b.id, body="intruder")
        ),
        caller.runs.GetAgent(agents_pb2.GetAgentRequest(agent_id=world.agent_b)),
        caller.runs.ListAgents(agents_pb2.ListAgentsRequest(company_id=world.company_b)),
    ]
    return [await expect_error(call) for call in calls]


async def test_agent_of_company_a_cannot_touch_company_b(gw: GatewayEnv, world: World) -> None:
    _, token = await gw.run_token(world.company_a, world.agent_a)
    caller = gw.caller(token)
    before = await row_counts(gw.db, world)

    errors = await _touch_company_b(caller, world)

    assert [(e.code, e.reason) for e in errors] == [
        (PERMISSION_DENIED, "COMPANY_ACCESS_DENIED")
    ] * len(errors), [e.message for e in errors]
    checkout_b = await expect_error(
        caller.issues.CheckoutIssue(
            issues_pb2.CheckoutIssueRequest(
                issue_id=world.issue_b.id, agent_id=world.agent_a, expected_statuses=_todo()
            )
        )
    )
    assert checkout_b.code is PERMISSION_DENIED, checkout_b.reason
    await assert_unchanged(gw, world, before)
    issue_b = await gw.admin.issues.GetIssue(issues_pb2.GetIssueRequest(issue=world.issue_b.id))
    assert issue_b == world.issue_b


async def test_member_of_company_a_cannot_touch_company_b(gw: GatewayEnv, world: World) -> None:
    caller = gw.caller(world.admin_a.token)
    before = await row_counts(gw.db, world)

    errors = await _touch_company_b(caller, world)

    assert [(e.code, e.reason) for e in errors] == [
        (PERMISSION_DENIED, "COMPANY_ACCESS_DENIED")
    ] * len(errors), [e.message for e in errors]
    await assert_unchanged(gw, world, before)


async def test_agent_cannot_act_as_another_agent_or_the_board(gw: GatewayEnv, world: World) -> None:
    _, token = await gw.run_token(world.company_a, world.agent_a)
    caller = gw.caller(token)
    before = await row_counts(gw.db, world)

    mismatch = await expect_error(
        caller.issues.CheckoutIssue(
            issues_pb2.CheckoutIssueRequest(
                issue_id=world.issue_a.id, agent_id=world.agent_a2, expected_statuses=_todo()
            )
        )
    )
    await assert_refused(
        caller,
        world,
        ("CreateCompany", "CreateApiKey", "RevokeApiKey"),
        PERMISSION_DENIED,
        "BOARD_REQUIRED",
    )

    assert (mismatch.code, mismatch.reason) == (PERMISSION_DENIED, "AGENT_MISMATCH")
    await assert_unchanged(gw, world, before)


async def test_internal_services_are_unimplemented_for_everyone(
    gw: GatewayEnv, world: World
) -> None:
    run_id, token = await gw.run_token(world.company_a, world.agent_a)
    before = await row_counts(gw.db, world)
    for caller in (gw.caller(token), gw.admin, gw.caller(None)):
        calls: list[Awaitable[Any]] = [
            caller.locks.AcquireExecutionLock(
                issue_locks_pb2.AcquireExecutionLockRequest(
                    issue_id=world.issue_a.id, run_id=run_id, agent_id=world.agent_a
                )
            ),
            caller.locks.ReleaseRunLocks(issue_locks_pb2.ReleaseRunLocksRequest(run_id=run_id)),
            caller.locks.EscalateStrandedIssue(
                issue_locks_pb2.EscalateStrandedIssueRequest(issue_id=world.issue_a.id)
            ),
        ]
        for call in calls:
            error = await expect_error(call)
            assert error.code is UNIMPLEMENTED, error.message
    await assert_unchanged(gw, world, before)


# -- forged actor headers ---------------------------------------------------------------

FORGED_ADMIN = Actor(type=ActorType.BOARD, user_id="forged-admin", is_instance_admin=True)


@pytest.mark.parametrize("key", [INTERNAL_KEY, b"some-other-key"], ids=["right-key", "wrong-key"])
async def test_forged_actor_header_is_ignored(gw: GatewayEnv, world: World, key: bytes) -> None:
    forged = sign_actor(FORGED_ADMIN, key)
    viewer = gw.caller(world.viewer_a.token, *forged)
    before = await row_counts(gw.db, world)

    me = await viewer.auth.WhoAmI(auth_pb2.WhoAmIRequest())
    await assert_refused(viewer, world, WRITES, PERMISSION_DENIED, "COMPANY_ACCESS_DENIED")
    await assert_refused(
        viewer, world, ("CreateCompany", "CreateApiKey"), PERMISSION_DENIED, "BOARD_REQUIRED"
    )
    anonymous = gw.caller(None, *forged)
    await assert_refused(anonymous, world, list(PROBES), UNAUTHENTICATED, "UNAUTHENTICATED")

    await assert_unchanged(gw, world, before)
    assert (me.type, me.user_id, me.is_instance_admin) == (
        auth_pb2.ACTOR_TYPE_BOARD,
        world.viewer_a.api_key.user_id,
        False,
    )


async def test_forged_actor_header_does_not_change_who_the_services_see(
    gw: GatewayEnv, world: World
) -> None:
    """A member's write goes through with forged headers, recorded as the member's."""
    forged_agent = Actor(
        type=ActorType.AGENT, agent_id=world.agent_b, company_id=world.company_b, run_id=None
    )
    member = gw.caller(
        world.member_a.token,
        *sign_actor(FORGED_ADMIN, INTERNAL_KEY),
        *sign_actor(forged_agent, INTERNAL_KEY),
    )

    created = await member.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=world.company_a, title="by the member")
    )

    actor_type, actor_id = (
        await fetch_value(
            gw.db,
            "SELECT actor_type FROM audit.activity_log WHERE entity_id = :id "
            "AND action = 'issue.created'",
            id=created.id,
        ),
        await fetch_value(
            gw.db,
            "SELECT actor_id FROM audit.activity_log WHERE entity_id = :id "
            "AND action = 'issue.created'",
            id=created.id,
        ),
    )
    assert (actor_type, actor_id) == ("user", world.member_a.api_key.user_id)
    # And a forged agent of company B gets an agent of company A nowhere near B.
    _, token = await gw.run_token(world.company_a, world.agent_a)
    agent = gw.caller(token, *sign_actor(forged_agent, INTERNAL_KEY))
    me = await agent.auth.WhoAmI(auth_pb2.WhoAmIRequest())
    assert (me.agent_id, list(me.company_ids)) == (world.agent_a, [world.company_a])
    error = await expect_error(
        agent.issues.GetCompany(issues_pb2.GetCompanyRequest(company_id=world.company_b))
    )
    assert (error.code, error.reason) == (PERMISSION_DENIED, "COMPANY_ACCESS_DENIED")


# -- WhoAmI -----------------------------------------------------------------------------


async def test_whoami_reports_a_board_key(gw: GatewayEnv, world: World) -> None:
    me = await gw.caller(world.member_a.token).auth.WhoAmI(auth_pb2.WhoAmIRequest())

    assert me == auth_pb2.Actor(
        type=auth_pb2.ACTOR_TYPE_BOARD,
        user_id=world.member_a.api_key.user_id,
        is_instance_admin=False,
        memberships=[
            auth_pb2.CompanyMembership(company_id=world.company_a, role=auth_pb2.ROLE_MEMBER)
        ],
        company_ids=[world.company_a],
        api_key_id=world.member_a.api_key.id,
    )
    admin = await gw.admin.auth.WhoAmI(auth_pb2.WhoAmIRequest())
    assert (admin.type, admin.is_instance_admin) == (auth_pb2.ACTOR_TYPE_BOARD, True)


async def test_whoami_reports_an_agent_token(gw: GatewayEnv, world: World) -> None:
    run_id, token = await gw.run_token(world.company_a, world.agent_a)

    me = await gw.caller(token).auth.WhoAmI(auth_pb2.WhoAmIRequest())

    assert me == auth_pb2.Actor(
        type=auth_pb2.ACTOR_TYPE_AGENT,
        agent_id=world.agent_a,
        run_id=run_id,
        company_ids=[world.company_a],
    )


async def test_bearer_scheme_is_case_insensitive(gw: GatewayEnv, world: World) -> None:
    caller = gw.raw_caller((("authorization", f"bearer {world.member_a.token}"),))

    me = await caller.auth.WhoAmI(auth_pb2.WhoAmIRequest())

    assert me.user_id == world.member_a.api_key.user_id


# -- CreateApiKey / RevokeApiKey --------------------------------------------------------


async def test_instance_admin_creates_a_working_key_stored_only_as_a_hash(
    gw: GatewayEnv, world: World
) -> None:
    user = f"new-user-{uuid.uuid4().hex[:8]}"

    created = await gw.admin.auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(
            user_id=user,
            name="ci tool",
            memberships=[
                auth_pb2.CompanyMembership(company_id=world.company_a, role=auth_pb2.ROLE_MEMBER),
                auth_pb2.CompanyMembership(company_id=world.company_b, role=auth_pb2.ROLE_VIEWER),
            ],
        )
    )

    assert created.token.startswith(keys.KEY_PREFIX) and len(created.token) > 40
    key = created.api_key
    assert (key.user_id, key.name, key.is_instance_admin) == (user, "ci tool", False)
    assert {(m.company_id, m.role) for m in key.memberships} == {
        (world.company_a, auth_pb2.ROLE_MEMBER),
        (world.company_b, auth_pb2.ROLE_VIEWER),
    }
    assert key.HasField("created_at") and not key.HasField("revoked_at")
    # The token works, as that user with those memberships.
    caller = gw.caller(created.token)
    me = await caller.auth.WhoAmI(auth_pb2.WhoAmIRequest())
    assert (me.user_id, me.api_key_id) == (user, key.id)
    await caller.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=world.company_a, title="by the new member")
    )
    viewer_write = await expect_error(
        caller.issues.CreateIssue(
            issues_pb2.CreateIssueRequest(company_id=world.company_b, title="viewer in B")
        )
    )
    assert viewer_write.reason == "COMPANY_ACCESS_DENIED"
    # Only the SHA-256 is stored; the secret appears in no column of the key or the audit.
    stored = await fetch_value(
        gw.db, "SELECT key_hash FROM gateway.api_keys WHERE id = :id", id=key.id
    )
    assert bytes(stored) == hashlib.sha256(created.token.encode()).digest()
    for table in ("gateway.api_keys", "audit.activity_log", "gateway.users"):
        leaks = await fetch_value(
            gw.db,
            f"SELECT count(*) FROM {table} t WHERE strpos(t::text, :secret) > 0",
            secret=created.token[len(keys.KEY_PREFIX) :],
        )
        assert leaks == 0, table
    audited = await fetch_value(
        gw.db,
        "SELECT count(*) FROM audit.activity_log WHERE entity_id = :id "
        "AND action = 'api_key.created'",
        id=key.id,
    )
    assert audited == 2  # one row per company of the key


async def test_instance_admin_key_can_create_keys(gw: GatewayEnv, world: World) -> None:
    created = await gw.new_key(f"second-admin-{uuid.uuid4().hex[:8]}", is_instance_admin=True)

    another = await gw.caller(created.token).auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(user_id=f"u-{uuid.uuid4().hex[:8]}")
    )

    assert another.token and another.api_key.memberships == []


@pytest.mark.parametrize("who", ["admin_a", "member_a", "viewer_a", "agent"])
async def test_only_instance_admins_create_keys(gw: GatewayEnv, world: World, who: str) -> None:
    if who == "agent":
        _, token = await gw.run_token(world.company_a, world.agent_a)
    else:
        token = getattr(world, who).token
    caller = gw.caller(token)
    before = await row_counts(gw.db, world)

    error = await expect_error(
        caller.auth.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(
                user_id=f"escalated-{uuid.uuid4().hex[:6]}",
                is_instance_admin=True,
                memberships=[
                    auth_pb2.CompanyMembership(company_id=world.company_a, role=auth_pb2.ROLE_ADMIN)
                ],
            )
        )
    )

    assert (error.code, error.reason) == (PERMISSION_DENIED, "BOARD_REQUIRED")
    await assert_unchanged(gw, world, before)


def _membership(company_id: str, role: int = auth_pb2.ROLE_MEMBER) -> auth_pb2.CompanyMembership:
    return auth_pb2.CompanyMembership(company_id=company_id, role=role)  # type: ignore[arg-type]


BAD_KEY_REQUESTS: dict[str, tuple[Callable[[World], auth_pb2.CreateApiKeyRequest], set[str]]] = {
    "no-user": (lambda w: auth_pb2.CreateApiKeyRequest(user_id=""), {"user_id"}),
    "blank-user": (lambda w: auth_pb2.CreateApiKeyRequest(user_id="   "), {"user_id"}),
    "user-too-long": (lambda w: auth_pb2.CreateApiKeyRequest(user_id="u" * 201), {"user_id"}),
    "company-not-uuid": (
        lambda w: auth_pb2.CreateApiKeyRequest(user_id="x", memberships=[_membership("acme")]),
        {"memberships[0].company_id"},
    ),
    "role-unspecified": (
        lambda w: auth_pb2.CreateApiKeyRequest(
            user_id="x", memberships=[_membership(w.company_a, auth_pb2.ROLE_UNSPECIFIED)]
        ),
        {"memberships[0].role"},
    ),
    "role-unknown": (
        lambda w: auth_pb2.CreateApiKeyRequest(
            user_id="x", memberships=[_membership(w.company_a, 42)]
        ),
        {"memberships[0].role"},
    ),
    "company-twice": (
        lambda w: auth_pb2.CreateApiKeyRequest(
            user_id="x", memberships=[_membership(w.company_a), _membership(w.company_a)]
        ),
        {"memberships[1].company_id"},
    ),
    "no-such-company": (
        lambda w: auth_pb2.CreateApiKeyRequest(
            user_id="x", memberships=[_membership(str(uuid.uuid4()))]
        ),
        {"memberships"},
    ),
    "everything-wrong": (
        lambda w: auth_pb2.CreateApiKeyRequest(
            user_id="",
            name="n" * 1000,
            memberships=[_membership("acme"), _membership(w.company_a, 0)],
        ),
        {"user_id", "name", "memberships[0].company_id", "memberships[1].role"},
    ),
}


@pytest.mark.parametrize("case", list(BAD_KEY_REQUESTS))
async def test_bad_key_requests_are_invalid_and_write_nothing(
    gw: GatewayEnv, world: World, case: str
) -> None:
    build, fields = BAD_KEY_REQUESTS[case]
    before = await row_counts(gw.db, world)

    error = await expect_error(gw.admin.auth.CreateApiKey(build(world)))

    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert {v.field for v in error.violations} == fields, error.violations
    await assert_unchanged(gw, world, before)


async def test_revoke_is_idempotent(gw: GatewayEnv, world: World) -> None:
    created = await gw.new_key(f"twice-{uuid.uuid4().hex[:8]}", {world.company_a: Role.VIEWER})
    request = auth_pb2.RevokeApiKeyRequest(api_key_id=created.api_key.id)

    first = await gw.admin.auth.RevokeApiKey(request)
    second = await gw.admin.auth.RevokeApiKey(request)

    assert first.HasField("revoked_at")
    assert first == second
    error = await expect_error(gw.caller(created.token).auth.WhoAmI(auth_pb2.WhoAmIRequest()))
    assert (error.code, error.reason) == (UNAUTHENTICATED, "API_KEY_REVOKED")


async def test_revoke_of_a_bad_or_unknown_key(gw: GatewayEnv, world: World) -> None:
    before = await row_counts(gw.db, world)

    bad = await expect_error(
        gw.admin.auth.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(api_key_id="key-1"))
    )
    empty = await expect_error(gw.admin.auth.RevokeApiKey(auth_pb2.RevokeApiKeyRequest()))
    unknown = await expect_error(
        gw.admin.auth.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(api_key_id=str(uuid.uuid4())))
    )

    for error in (bad, empty):
        assert (error.code, [v.field for v in error.violations]) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            ["api_key_id"],
        )
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "API_KEY_NOT_FOUND")
    await assert_unchanged(gw, world, before)
    # The member's key, which a refused caller tried to revoke earlier, still works.
    await gw.caller(world.member_a.token).auth.WhoAmI(auth_pb2.WhoAmIRequest())
