"""CreateAgent, GetAgent and ListAgents against the real run service and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, Literal

import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import text

from common.actor import Role
from common.db import Database
from common.pagination import parse_page
from paperclip.runs.v1 import agents_pb2
from tests.harness import Clients, Suite, admin, agent, board, expect_error, new_company
from tests.run_service.support import audit_rows, count_rows, process_agent

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED
RuntimeField = Literal[
    "max_concurrent_runs",
    "timeout_seconds",
    "idle_timeout_seconds",
    "grace_seconds",
    "heartbeat_interval_seconds",
    "wake_on_demand",
    "daily_run_budget",
]
RUNTIME_DEFAULTS: dict[RuntimeField, int | bool] = {
    "max_concurrent_runs": 5,
    "timeout_seconds": 7200,
    "idle_timeout_seconds": 1800,
    "grace_seconds": 15,
    "heartbeat_interval_seconds": 0,
    "wake_on_demand": True,
    "daily_run_budget": 0,
}


def fields_of(error: object) -> list[str]:
    return [v.field for v in getattr(error, "violations", ())]


# --- CreateAgent: defaults and what is stored -------------------------------------------


async def test_create_agent_defaults_max_concurrent_runs_to_5(
    owner: Clients, company_id: str
) -> None:
    created = await owner.runs.CreateAgent(process_agent(company_id, "Defaults"))
    assert created.runtime_config.HasField("max_concurrent_runs")
    assert created.runtime_config.max_concurrent_runs == 5


async def test_created_agent_has_every_runtime_field_at_its_effective_value(
    owner: Clients, company_id: str
) -> None:
    created = await owner.runs.CreateAgent(process_agent(company_id, "Effective"))
    fetched = await owner.runs.GetAgent(agents_pb2.GetAgentRequest(agent_id=created.id))
    for agent_view in (created, fetched):
        for name, value in RUNTIME_DEFAULTS.items():
            assert agent_view.runtime_config.HasField(name), name
            assert getattr(agent_view.runtime_config, name) == value, name


async def test_create_agent_keeps_explicit_runtime_config(owner: Clients, company_id: str) -> None:
    runtime = agents_pb2.RuntimeConfig(
        max_concurrent_runs=1,
        timeout_seconds=604_800,
        idle_timeout_seconds=0,
        grace_seconds=600,
        heartbeat_interval_seconds=30,
        wake_on_demand=False,
        daily_run_budget=100_000,
    )
    created = await owner.runs.CreateAgent(
        process_agent(company_id, "Explicit", runtime_config=runtime)
    )
    fetched = await owner.runs.GetAgent(agents_pb2.GetAgentRequest(agent_id=created.id))
    assert created.runtime_config == runtime
    assert fetched.runtime_config == runtime


async def test_create_agent_persists_adapter_config_and_identity(
    owner: Clients, company_id: str
) -> None:
    config = agents_pb2.AdapterConfig(
        command=["python3", "agent.py", "--verbose"], cwd="/srv/agents", env={"MODE": "fast"}
    )
    created = await owner.runs.CreateAgent(
        process_agent(
            company_id, "  Builder.Bot  ", role=" reviewer ", adapter_type="", adapter_config=config
        )
    )
    fetched = await owner.runs.GetAgent(agents_pb2.GetAgentRequest(agent_id=created.id))
    assert fetched == created
    assert uuid.UUID(created.id)
    assert created.company_id == company_id
    assert created.name == "Builder.Bot"
    assert created.role == "reviewer"
    assert created.adapter_type == "process"
    assert created.status == agents_pb2.AGENT_STATUS_ACTIVE
    assert created.adapter_config == config
    assert created.created_at.seconds > 0
    assert created.updated_at == created.created_at


async def test_create_agent_writes_audit_row_without_env_values(
    suite: Suite, owner: Clients, company_id: str
) -> None:
    config = agents_pb2.AdapterConfig(command=["run-agent"], env={"API_KEY": "s3cret-value"})
    created = await owner.runs.CreateAgent(
        process_agent(company_id, "Audited", adapter_config=config)
    )
    rows = await audit_rows(suite.db, created.id)
    assert [(r["action"], r["entity_type"], r["actor_id"]) for r in rows] == [
        ("agent.created", "agent", "owner")
    ]
    details = rows[0]["details"]
    assert details["name"] == "Audited"
    assert details["adapter_config"]["env_keys"] == ["API_KEY"]
    assert details["runtime_config"]["max_concurrent_runs"] == 5
    assert "s3cret-value" not in json.dumps(details)


# --- CreateAgent: names ------------------------------------------------------------------


async def test_duplicate_name_case_insensitive_is_already_exists(
    suite: Suite, owner: Clients, company_id: str
) -> None:
    await owner.runs.CreateAgent(process_agent(company_id, "Reviewer"))
    error = await expect_error(owner.runs.CreateAgent(process_agent(company_id, "rEVIEWER")))
    assert error.code is grpc.StatusCode.ALREADY_EXISTS
    assert error.reason == "AGENT_NAME_TAKEN"
    assert await _agents_of(suite.db, company_id) == 1


async def test_same_name_in_another_company_is_allowed(
    admin_clients: Clients, company_id: str
) -> None:
    other = (await new_company(admin_clients)).id
    first = await admin_clients.runs.CreateAgent(process_agent(company_id, "Shared"))
    second = await admin_clients.runs.CreateAgent(process_agent(other, "shared"))
    assert first.id != second.id


async def test_concurrent_creates_of_one_name_make_one_agent(
    suite: Suite, owner: Clients, company_id: str
) -> None:
    names = ["Racer", "racer", "RACER", "rAcEr", "Racer", "racer"]
    results = await asyncio.gather(
        *(owner.runs.CreateAgent(process_agent(company_id, n)) for n in names),
        return_exceptions=True,
    )
    created = [r for r in results if isinstance(r, agents_pb2.Agent)]
    failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(created) == 1
    assert len(failed) == len(names) - 1
    assert {f.code() for f in failed} == {grpc.StatusCode.ALREADY_EXISTS}
    assert await _agents_of(suite.db, company_id) == 1


@pytest.mark.parametrize(
    "name",
    ["", "   ", "two words", "a/b", "@bob", "bob.", ".bob", "-bob", "bøb", "tab\tx", "x" * 101],
)
async def test_name_that_is_no_mention_is_invalid(
    owner: Clients, company_id: str, name: str
) -> None:
    error = await expect_error(owner.runs.CreateAgent(process_agent(company_id, name)))
    assert error.code is INVALID
    assert fields_of(error) == ["name"]


@pytest.mark.parametrize("name", ["a", "Bob", "bob.smith", "claude_code-2", "x" * 100, "x_"])
async def test_mention_usable_names_are_accepted(
    owner: Clients, company_id: str, name: str
) -> None:
    created = await owner.runs.CreateAgent(process_agent(company_id, name))
    assert created.name == name


# --- CreateAgent: adapter and runtime validation ----------------------------------------


async def test_reserved_env_key_refused(owner: Clients, company_id: str) -> None:
    for key in ("PAPERCLIP_API_URL", "PAPERCLIP_", "paperclip_agent_token"):
        config = agents_pb2.AdapterConfig(command=["run"], env={key: "x"})
        error = await expect_error(
            owner.runs.CreateAgent(process_agent(company_id, "Env", adapter_config=config))
        )
        assert error.code is INVALID, key
        assert fields_of(error) == ["adapter_config.env"], key
        assert "reserved" in error.violations[0].description, key


@pytest.mark.parametrize("key", ["1ABC", "A-B", "", "WITH SPACE", "é"])
async def test_env_key_that_is_no_identifier_is_invalid(
    owner: Clients, company_id: str, key: str
) -> None:
    config = agents_pb2.AdapterConfig(command=["run"], env={key: "x"})
    error = await expect_error(
        owner.runs.CreateAgent(process_agent(company_id, "Env", adapter_config=config))
    )
    assert fields_of(error) == ["adapter_config.env"]


async def test_identifier_env_keys_are_accepted(owner: Clients, company_id: str) -> None:
    env = {"_PRIVATE": "1", "a1": "2", "PAPERCLIPX": "3", "HOME_PAPERCLIP_": "4"}
    config = agents_pb2.AdapterConfig(command=["run"], env=env)
    created = await owner.runs.CreateAgent(
        process_agent(company_id, "EnvOk", adapter_config=config)
    )
    assert dict(created.adapter_config.env) == env


@pytest.mark.parametrize(
    ("command", "field"),
    [
        ([], "adapter_config.command"),
        (["run", ""], "adapter_config.command[1]"),
        (["run", "x" * 4097], "adapter_config.command[1]"),
        (["run", "a\x00b"], "adapter_config.command[1]"),
        (["a"] * 257, "adapter_config.command"),
    ],
)
async def test_bad_command_is_invalid(
    owner: Clients, company_id: str, command: list[str], field: str
) -> None:
    config = agents_pb2.AdapterConfig(command=command)
    error = await expect_error(
        owner.runs.CreateAgent(process_agent(company_id, "Cmd", adapter_config=config))
    )
    assert error.code is INVALID
    assert fields_of(error) == [field]


async def test_command_at_its_limits_is_accepted(owner: Clients, company_id: str) -> None:
    command = ["x" * 4096] + ["a"] * 255
    config = agents_pb2.AdapterConfig(command=command)
    created = await owner.runs.CreateAgent(
        process_agent(company_id, "CmdMax", adapter_config=config)
    )
    assert list(created.adapter_config.command) == command


@pytest.mark.parametrize("cwd", ["relative/dir", "./here", "~/home"])
async def test_relative_cwd_is_invalid(owner: Clients, company_id: str, cwd: str) -> None:
    config = agents_pb2.AdapterConfig(command=["run"], cwd=cwd)
    error = await expect_error(
        owner.runs.CreateAgent(process_agent(company_id, "Cwd", adapter_config=config))
    )
    assert fields_of(error) == ["adapter_config.cwd"]


async def test_adapter_type_other_than_process_is_invalid(owner: Clients, company_id: str) -> None:
    error = await expect_error(
        owner.runs.CreateAgent(process_agent(company_id, "Docker", adapter_type="docker"))
    )
    assert fields_of(error) == ["adapter_type"]


@pytest.mark.parametrize(
    ("field", "bad", "good"),
    [
        ("max_concurrent_runs", [0, 101, -1], [1, 100]),
        ("timeout_seconds", [0, 604_801], [1, 604_800]),
        ("idle_timeout_seconds", [-1, 604_801], [0, 604_800]),
        ("grace_seconds", [0, 601], [1, 600]),
        ("heartbeat_interval_seconds", [-1, 1, 29, 604_801], [0, 30, 604_800]),
    ],
)
async def test_runtime_config_bounds(
    owner: Clients, company_id: str, field: str, bad: list[int], good: list[int]
) -> None:
    for value in bad:
        fields: dict[str, Any] = {field: value}
        runtime = agents_pb2.RuntimeConfig(**fields)
        error = await expect_error(
            owner.runs.CreateAgent(process_agent(company_id, "Rt", runtime_config=runtime))
        )
        assert fields_of(error) == [f"runtime_config.{field}"], value
    for value in good:
        fields = {field: value}
        runtime = agents_pb2.RuntimeConfig(**fields)
        created = await owner.runs.CreateAgent(
            process_agent(company_id, f"rt-{uuid.uuid4().hex[:8]}", runtime_config=runtime)
        )
        assert getattr(created.runtime_config, field) == value


async def test_bad_input_on_every_field_writes_nothing(
    suite: Suite, admin_clients: Clients, owner: Clients, company_id: str
) -> None:
    bad_config = agents_pb2.AdapterConfig(
        command=["", "y" * 4097], cwd="relative", env={"PAPERCLIP_RUN_ID": "x", "1BAD": "v"}
    )
    bad_runtime = agents_pb2.RuntimeConfig(
        max_concurrent_runs=0,
        timeout_seconds=0,
        idle_timeout_seconds=-1,
        grace_seconds=601,
        heartbeat_interval_seconds=10,
    )
    expected = {
        "name",
        "role",
        "adapter_type",
        "adapter_config.command[0]",
        "adapter_config.command[1]",
        "adapter_config.cwd",
        "adapter_config.env",
        "runtime_config.max_concurrent_runs",
        "runtime_config.timeout_seconds",
        "runtime_config.idle_timeout_seconds",
        "runtime_config.grace_seconds",
        "runtime_config.heartbeat_interval_seconds",
    }
    agents_before = await count_rows(suite.db, "runs.agents")
    audit_before = await count_rows(suite.db, "audit.activity_log")
    for clients, company in ((admin_clients, "not-a-uuid"), (owner, company_id)):
        request = process_agent(
            company,
            "bad name!",
            role="r" * 101,
            adapter_type="docker",
            adapter_config=bad_config,
            runtime_config=bad_runtime,
        )
        error = await expect_error(clients.runs.CreateAgent(request))
        assert error.code is INVALID
        assert error.reason == "INVALID_ARGUMENT"
        want = expected | ({"company_id"} if company == "not-a-uuid" else set())
        assert set(fields_of(error)) == want
        assert len(fields_of(error)) == len(want) + 1  # two bad env keys
    assert await count_rows(suite.db, "runs.agents") == agents_before
    assert await count_rows(suite.db, "audit.activity_log") == audit_before


# --- CreateAgent: who may ----------------------------------------------------------------


async def test_viewer_cannot_create_agent(suite: Suite, company_id: str) -> None:
    viewer = suite.clients(board(company_id, Role.VIEWER, user_id="viewer"))
    error = await expect_error(viewer.runs.CreateAgent(process_agent(company_id, "Nope")))
    assert (error.code, error.reason) == (DENIED, "COMPANY_ACCESS_DENIED")
    assert await _agents_of(suite.db, company_id) == 0


async def test_member_can_create_agent(suite: Suite, company_id: str) -> None:
    member = suite.clients(board(company_id, Role.MEMBER, user_id="member"))
    created = await member.runs.CreateAgent(process_agent(company_id, "ByMember"))
    assert created.name == "ByMember"


async def test_agent_cannot_create_agent(suite: Suite, owner: Clients, company_id: str) -> None:
    existing = await owner.runs.CreateAgent(process_agent(company_id, "Existing"))
    as_agent = suite.clients(agent(existing.id, company_id, str(uuid.uuid4())))
    error = await expect_error(as_agent.runs.CreateAgent(process_agent(company_id, "Spawned")))
    assert (error.code, error.reason) == (DENIED, "BOARD_REQUIRED")
    assert await _agents_of(suite.db, company_id) == 1


async def test_board_of_another_company_cannot_create_agent(
    suite: Suite, admin_clients: Clients, company_id: str
) -> None:
    other = (await new_company(admin_clients)).id
    outsider = suite.clients(board(other, Role.ADMIN, user_id="outsider"))
    error = await expect_error(outsider.runs.CreateAgent(process_agent(company_id, "Nope")))
    assert (error.code, error.reason) == (DENIED, "COMPANY_ACCESS_DENIED")


async def test_create_in_unknown_company_is_not_found(admin_clients: Clients) -> None:
    error = await expect_error(
        admin_clients.runs.CreateAgent(process_agent(str(uuid.uuid4()), "Ghost"))
    )
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "COMPANY_NOT_FOUND")


async def test_call_without_signed_actor_is_unauthenticated(suite: Suite, company_id: str) -> None:
    anonymous = suite.clients(None)
    error = await expect_error(anonymous.runs.CreateAgent(process_agent(company_id, "Anon")))
    assert error.code is grpc.StatusCode.UNAUTHENTICATED


# --- GetAgent ----------------------------------------------------------------------------


@pytest.mark.parametrize("agent_id", ["", "nope", "1234"])
async def test_get_agent_with_malformed_id_is_invalid(owner: Clients, agent_id: str) -> None:
    error = await expect_error(owner.runs.GetAgent(agents_pb2.GetAgentRequest(agent_id=agent_id)))
    assert error.code is INVALID
    assert fields_of(error) == ["agent_id"]


async def test_get_missing_agent_is_not_found(owner: Clients) -> None:
    request = agents_pb2.GetAgentRequest(agent_id=str(uuid.uuid4()))
    error = await expect_error(owner.runs.GetAgent(request))
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "AGENT_NOT_FOUND")


async def test_agent_of_other_company_is_denied(
    suite: Suite, admin_clients: Clients, owner: Clients, company_id: str
) -> None:
    target = await owner.runs.CreateAgent(process_agent(company_id, "Private"))
    other = (await new_company(admin_clients)).id
    other_agent = await admin_clients.runs.CreateAgent(process_agent(other, "Neighbour"))
    request = agents_pb2.GetAgentRequest(agent_id=target.id)
    for outsider in (
        board(other, Role.ADMIN, user_id="outsider"),
        agent(other_agent.id, other, str(uuid.uuid4())),
    ):
        error = await expect_error(suite.clients(outsider).runs.GetAgent(request))
        assert (error.code, error.reason) == (DENIED, "COMPANY_ACCESS_DENIED")


async def test_agents_and_viewers_of_the_company_may_read(
    suite: Suite, owner: Clients, company_id: str
) -> None:
    target = await owner.runs.CreateAgent(process_agent(company_id, "Readable"))
    colleague = await owner.runs.CreateAgent(process_agent(company_id, "Colleague"))
    request = agents_pb2.GetAgentRequest(agent_id=target.id)
    for reader in (
        board(company_id, Role.VIEWER, user_id="viewer"),
        agent(colleague.id, company_id, str(uuid.uuid4())),
    ):
        assert await suite.clients(reader).runs.GetAgent(request) == target


# --- ListAgents --------------------------------------------------------------------------


async def test_list_paginates_without_duplicates(
    suite: Suite, owner: Clients, company_id: str
) -> None:
    created = [
        await owner.runs.CreateAgent(process_agent(company_id, f"page-{i}")) for i in range(7)
    ]
    # Ties on created_at must still page by id: give four agents the same instant.
    async with suite.db.transaction() as conn:
        await conn.execute(
            text("UPDATE runs.agents SET created_at = '2020-01-01T00:00:00Z' WHERE id = ANY(:ids)"),
            {"ids": [uuid.UUID(a.id) for a in created[2:6]]},
        )
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await owner.runs.ListAgents(
            agents_pb2.ListAgentsRequest(company_id=company_id, page_size=3, page_token=token)
        )
        pages += 1
        assert len(page.agents) <= 3
        seen.extend(a.id for a in page.agents)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert len(seen) == len(set(seen)) == 7
    tied = sorted((a.id for a in created[2:6]), key=uuid.UUID)
    assert seen == tied + [a.id for a in created[:2]] + [created[6].id]


async def test_list_without_page_size_returns_all_and_no_token(
    owner: Clients, company_id: str
) -> None:
    for i in range(3):
        await owner.runs.CreateAgent(process_agent(company_id, f"all-{i}"))
    page = await owner.runs.ListAgents(agents_pb2.ListAgentsRequest(company_id=company_id))
    assert [a.name for a in page.agents] == ["all-0", "all-1", "all-2"]
    assert page.next_page_token == ""


async def test_list_filters_by_status(owner: Clients, company_id: str) -> None:
    active = await owner.runs.CreateAgent(process_agent(company_id, "Active"))
    paused = await owner.runs.CreateAgent(process_agent(company_id, "Paused"))
    paused.status = agents_pb2.AGENT_STATUS_PAUSED
    await owner.runs.UpdateAgent(
        agents_pb2.UpdateAgentRequest(
            agent=paused, update_mask=field_mask_pb2.FieldMask(paths=["status"])
        )
    )

    async def names(*statuses: agents_pb2.AgentStatus.ValueType) -> list[str]:
        request = agents_pb2.ListAgentsRequest(company_id=company_id, statuses=statuses)
        return [a.name for a in (await owner.runs.ListAgents(request)).agents]

    assert await names(agents_pb2.AGENT_STATUS_PAUSED) == [paused.name]
    assert await names(agents_pb2.AGENT_STATUS_ACTIVE) == [active.name]
    both = (agents_pb2.AGENT_STATUS_ACTIVE, agents_pb2.AGENT_STATUS_PAUSED)
    assert await names(*both) == ["Active", "Paused"]
    assert await names(agents_pb2.AGENT_STATUS_TERMINATED) == []


async def test_list_shows_only_the_companys_agents(
    admin_clients: Clients, owner: Clients, company_id: str
) -> None:
    other = (await new_company(admin_clients)).id
    await admin_clients.runs.CreateAgent(process_agent(other, "Elsewhere"))
    mine = await owner.runs.CreateAgent(process_agent(company_id, "Mine"))
    page = await owner.runs.ListAgents(agents_pb2.ListAgentsRequest(company_id=company_id))
    assert [a.id for a in page.agents] == [mine.id]


async def test_negative_page_size_is_invalid(owner: Clients, company_id: str) -> None:
    request = agents_pb2.ListAgentsRequest(company_id=company_id, page_size=-1)
    error = await expect_error(owner.runs.ListAgents(request))
    assert error.code is INVALID
    assert fields_of(error) == ["page_size"]


@pytest.mark.parametrize("token", ["garbage!", "e30", "bm90LWpzb24"])
async def test_malformed_page_token_is_invalid(owner: Clients, company_id: str, token: str) -> None:
    request = agents_pb2.ListAgentsRequest(company_id=company_id, page_token=token)
    error = await expect_error(owner.runs.ListAgents(request))
    assert error.code is INVALID
    assert fields_of(error) == ["page_token"]


@pytest.mark.parametrize(
    "cursor",
    [
        {},
        {"t": "yesterday", "id": str(uuid.uuid4())},
        {"t": "2020-01-01T00:00:00+00:00"},
        {"t": "2020-01-01T00:00:00+00:00", "id": "x"},
        {"t": "2020-01-01T00:00:00", "id": str(uuid.uuid4())},
    ],
)
async def test_forged_page_token_is_invalid(
    owner: Clients, company_id: str, cursor: dict[str, str]
) -> None:
    token = parse_page(0, "", company_id=company_id, statuses=[]).next_token(cursor)
    request = agents_pb2.ListAgentsRequest(company_id=company_id, page_token=token)
    error = await expect_error(owner.runs.ListAgents(request))
    assert error.code is INVALID
    assert fields_of(error) == ["page_token"]


async def test_page_token_of_other_filters_is_invalid(owner: Clients, company_id: str) -> None:
    for i in range(2):
        await owner.runs.CreateAgent(process_agent(company_id, f"tok-{i}"))
    first = await owner.runs.ListAgents(
        agents_pb2.ListAgentsRequest(company_id=company_id, page_size=1)
    )
    assert first.next_page_token
    request = agents_pb2.ListAgentsRequest(
        company_id=company_id,
        page_size=1,
        page_token=first.next_page_token,
        statuses=[agents_pb2.AGENT_STATUS_ACTIVE],
    )
    error = await expect_error(owner.runs.ListAgents(request))
    assert fields_of(error) == ["page_token"]


async def test_list_requires_a_company_and_known_statuses(owner: Clients) -> None:
    error = await expect_error(owner.runs.ListAgents(agents_pb2.ListAgentsRequest()))
    assert fields_of(error) == ["company_id"]
    request = agents_pb2.ListAgentsRequest(
        company_id=str(uuid.uuid4()),
        statuses=[agents_pb2.AGENT_STATUS_UNSPECIFIED, agents_pb2.AgentStatus.ValueType(42)],
    )
    error = await expect_error(owner.runs.ListAgents(request))
    assert fields_of(error) == ["statuses[0]", "statuses[1]"]


async def test_list_of_other_company_is_denied(
    suite: Suite, admin_clients: Clients, company_id: str
) -> None:
    other = (await new_company(admin_clients)).id
    outsider = suite.clients(board(other, Role.ADMIN, user_id="outsider"))
    error = await expect_error(
        outsider.runs.ListAgents(agents_pb2.ListAgentsRequest(company_id=company_id))
    )
    assert (error.code, error.reason) == (DENIED, "COMPANY_ACCESS_DENIED")


async def test_list_of_unknown_company_is_not_found(suite: Suite) -> None:
    request = agents_pb2.ListAgentsRequest(company_id=str(uuid.uuid4()))
    error = await expect_error(suite.clients(admin()).runs.ListAgents(request))
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "COMPANY_NOT_FOUND")


async def _agents_of(db: Database, company_id: str) -> int:
    async with db.transaction() as conn:
        result = await conn.execute(
            text("SELECT count(*) FROM runs.agents WHERE company_id = :c"), {"c": company_id}
        )
        return int(result.scalar_one())


async def test_agents_see_env_keys_but_not_values_of_other_agents(suite: Suite) -> None:
    board_clients = suite.clients(admin())
    company = await new_company(board_clients)
    created = await board_clients.runs.CreateAgent(
        agents_pb2.CreateAgentRequest(
            company_id=company.id,
            name="keeper",
            adapter_type="process",
            adapter_config=agents_pb2.AdapterConfig(command=["true"], env={"API_TOKEN": "s3cret"}),
        )
    )
    peer = suite.clients(agent(str(uuid.uuid4()), company.id, str(uuid.uuid4())))
    seen = await peer.runs.GetAgent(agents_pb2.GetAgentRequest(agent_id=created.id))
    assert dict(seen.adapter_config.env) == {"API_TOKEN": ""}
    listed = await peer.runs.ListAgents(agents_pb2.ListAgentsRequest(company_id=company.id))
    assert [dict(a.adapter_config.env) for a in listed.agents] == [{"API_TOKEN": ""}]
    as_board = await board_clients.runs.GetAgent(agents_pb2.GetAgentRequest(agent_id=created.id))
    assert dict(as_board.adapter_config.env) == {"API_TOKEN": "s3cret"}
