"""UpdateAgent: pause, resume, terminate, rename and reconfigure, with audit rows."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import text

from common.actor import Role
from paperclip.runs.v1 import agents_pb2
from tests.harness import Clients, Suite, agent, board, expect_error, new_company
from tests.run_service.support import audit_rows, count_rows, process_agent

ACTIVE = agents_pb2.AGENT_STATUS_ACTIVE
PAUSED = agents_pb2.AGENT_STATUS_PAUSED
TERMINATED = agents_pb2.AGENT_STATUS_TERMINATED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED


def update_request(agent_id: str, paths: list[str], **fields: Any) -> agents_pb2.UpdateAgentRequest:
    return agents_pb2.UpdateAgentRequest(
        agent=agents_pb2.Agent(id=agent_id, **fields),
        update_mask=field_mask_pb2.FieldMask(paths=paths),
    )


async def set_status(
    clients: Clients, agent_id: str, status: agents_pb2.AgentStatus.ValueType
) -> agents_pb2.Agent:
    return await clients.runs.UpdateAgent(update_request(agent_id, ["status"], status=status))


async def actions(suite: Suite, agent_id: str) -> list[str]:
    return [row["action"] for row in await audit_rows(suite.db, agent_id)]


def fields_of(error: object) -> list[str]:
    return [v.field for v in getattr(error, "violations", ())]


@pytest.fixture
async def worker(owner: Clients, company_id: str) -> agents_pb2.Agent:
    """An active agent with a non-default runtime config."""
    runtime = agents_pb2.RuntimeConfig(max_concurrent_runs=3, timeout_seconds=100)
    return await owner.runs.CreateAgent(process_agent(company_id, "Worker", runtime_config=runtime))


# --- status ------------------------------------------------------------------------------


async def test_pause_then_resume(suite: Suite, owner: Clients, worker: agents_pb2.Agent) -> None:
    paused = await set_status(owner, worker.id, PAUSED)
    assert paused.status == PAUSED
    fetched = await owner.runs.GetAgent(agents_pb2.GetAgentRequest(agent_id=worker.id))
    assert fetched.status == PAUSED
    resumed = await set_status(owner, worker.id, ACTIVE)
    assert resumed.status == ACTIVE
    rows = await audit_rows(suite.db, worker.id)
    assert [r["action"] for r in rows] == ["agent.created", "agent.paused", "agent.resumed"]
    assert rows[1]["details"] == {"changes": {"status": {"from": "active", "to": "paused"}}}
    assert rows[2]["details"] == {"changes": {"status": {"from": "paused", "to": "active"}}}


@pytest.mark.parametrize("start", [ACTIVE, PAUSED])
async def test_active_or_paused_agent_can_be_terminated(
    suite: Suite, owner: Clients, worker: agents_pb2.Agent, start: int
) -> None:
    if start == PAUSED:
        await set_status(owner, worker.id, PAUSED)
    terminated = await set_status(owner, worker.id, TERMINATED)
    assert terminated.status == TERMINATED
    assert (await actions(suite, worker.id))[-1] == "agent.terminated"


@pytest.mark.parametrize(
    ("paths", "fields"),
    [
        (["status"], {"status": ACTIVE}),
        (["status"], {"status": PAUSED}),
        (["name"], {"name": "Reborn"}),
        (["role"], {"role": "manager"}),
        (["runtime_config.max_concurrent_runs"], {"runtime_config": {"max_concurrent_runs": 9}}),
        (["adapter_config"], {"adapter_config": {"command": ["other"]}}),
    ],
)
async def test_terminated_agent_cannot_be_resumed(
    suite: Suite,
    owner: Clients,
    worker: agents_pb2.Agent,
    paths: list[str],
    fields: dict[str, Any],
) -> None:
    """Terminated is final: resuming, pausing or any other change fails."""
    terminated = await set_status(owner, worker.id, TERMINATED)
    error = await expect_error(owner.runs.UpdateAgent(update_request(worker.id, paths, **fields)))
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "AGENT_TERMINATED"
    fetched = await owner.runs.GetAgent(agents_pb2.GetAgentRequest(agent_id=worker.id))
    assert fetched == terminated
    assert (await actions(suite, worker.id))[-1] == "agent.terminated"


async def test_terminating_twice_is_a_no_op(
    suite: Suite, owner: Clients, worker: agents_pb2.Agent
) -> None:
    first = await set_status(owner, worker.id, TERMINATED)
    again = await set_status(owner, worker.id, TERMINATED)
    assert again == first
    assert await actions(suite, worker.id) == ["agent.created", "agent.terminated"]


async def test_setting_the_same_status_is_a_no_op(
    suite: Suite, owner: Clients, worker: agents_pb2.Agent
) -> None:
    same = await set_status(owner, worker.id, ACTIVE)
    assert same == worker
    assert same.updated_at == worker.updated_at
    assert await actions(suite, worker.id) == ["agent.created"]


@pytest.mark.parametrize("status", [agents_pb2.AGENT_STATUS_UNSPECIFIED, 7])
async def test_unspecified_or_unknown_status_is_invalid(
    owner: Clients, worker: agents_pb2.Agent, status: int
) -> None:
    error = await expect_error(
        owner.runs.UpdateAgent(update_request(worker.id, ["status"], status=status))
    )
    assert error.code is INVALID
    assert fields_of(error) == ["agent.status"]


async def test_concurrent_pauses_change_the_agent_once(
    suite: Suite, owner: Clients, worker: agents_pb2.Agent
) -> None:
    """Every pause reads the agent under its row lock: one changes it, the rest are no-ops."""
    # Hold the row so that all six calls are in flight together before any can proceed.
    async with suite.db.transaction() as conn:
        await conn.execute(
            text("SELECT 1 FROM runs.agents WHERE id = :id FOR UPDATE"), {"id": worker.id}
        )
        calls = [asyncio.ensure_future(set_status(owner, worker.id, PAUSED)) for _ in range(6)]
        await asyncio.sleep(0.5)
        assert not any(call.done() for call in calls)
    results = await asyncio.gather(*calls)
    assert {r.status for r in results} == {PAUSED}
    assert await actions(suite, worker.id) == ["agent.created", "agent.paused"]


# --- update_mask -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["id", "company_id", "adapter_type", "created_at", "runtime_config.bogus", "nme", "*"]
)
async def test_update_mask_unknown_path_is_invalid(
    suite: Suite, owner: Clients, worker: agents_pb2.Agent, path: str
) -> None:
    request = update_request(worker.id, ["role", path], role="changed")
    error = await expect_error(owner.runs.UpdateAgent(request))
    assert error.code is INVALID
    assert fields_of(error) == ["update_mask.paths[1]"]
    fetched = await owner.runs.GetAgent(agents_pb2.GetAgentRequest(agent_id=worker.id))
    assert fetched.role == worker.role


async def test_update_mask_is_required(owner: Clients, worker: agents_pb2.Agent) -> None:
    error = await expect_error(owner.runs.UpdateAgent(update_request(worker.id, [], role="x")))
    assert error.code is INVALID
    assert fields_of(error) == ["update_mask"]


async def test_fields_outside_the_mask_are_left_alone(
    owner: Clients, worker: agents_pb2.Agent
) -> None:
    updated = await owner.runs.UpdateAgent(
        update_request(worker.id, ["role"], role="lead", name="Ignored", status=PAUSED)
    )
    assert (updated.role, updated.name, updated.status) == ("lead", "Worker", ACTIVE)


# --- runtime and adapter config ----------------------------------------------------------


async def test_runtime_field_path_changes_only_that_field(
    suite: Suite, owner: Clients, worker: agents_pb2.Agent
) -> None:
    updated = await owner.runs.UpdateAgent(
        update_request(
            worker.id,
            ["runtime_config.max_concurrent_runs"],
            runtime_config=agents_pb2.RuntimeConfig(max_concurrent_runs=7, grace_seconds=99),
        )
    )
    assert updated.runtime_config.max_concurrent_runs == 7
    assert updated.runtime_config.timeout_seconds == 100
    assert updated.runtime_config.grace_seconds == 15
    rows = await audit_rows(suite.db, worker.id)
    assert rows[-1]["action"] == "agent.updated"
    assert rows[-1]["details"] == {
        "changes": {"runtime_config.max_concurrent_runs": {"from": 3, "to": 7}}
    }


async def test_masked_runtime_field_without_value_goes_back_to_default(
    owner: Clients, worker: agents_pb2.Agent
) -> None:
    updated = await owner.runs.UpdateAgent(
        update_request(worker.id, ["runtime_config.timeout_seconds"])
    )
    assert updated.runtime_config.timeout_seconds == 7200
    assert updated.runtime_config.max_concurrent_runs == 3


async def test_whole_runtime_config_replaces_every_field(
    owner: Clients, worker: agents_pb2.Agent
) -> None:
    updated = await owner.runs.UpdateAgent(
        update_request(
            worker.id,
            ["runtime_config"],
            runtime_config=agents_pb2.RuntimeConfig(grace_seconds=30, wake_on_demand=False),
        )
    )
    assert updated.runtime_config == agents_pb2.RuntimeConfig(
        max_concurrent_runs=5,
        timeout_seconds=7200,
        idle_timeout_seconds=1800,
        grace_seconds=30,
        heartbeat_interval_seconds=0,
        wake_on_demand=False,
        daily_run_budget=0,
    )


async def test_adapter_config_is_replaced_and_audit_hides_env_values(
    suite: Suite, owner: Clients, worker: agents_pb2.Agent
) -> None:
    config = agents_pb2.AdapterConfig(
        command=["node", "agent.js"], cwd="/opt/agent", env={"TOKEN": "hunter2-secret"}
    )
    updated = await owner.runs.UpdateAgent(
        update_request(worker.id, ["adapter_config"], adapter_config=config)
    )
    assert updated.adapter_config == config
    fetched = await owner.runs.GetAgent(agents_pb2.GetAgentRequest(agent_id=worker.id))
    assert fetched.adapter_config == config
    change = (await audit_rows(suite.db, worker.id))[-1]["details"]["changes"]["adapter_config"]
    assert change["from"] == {"command": ["python3", "-c", "pass"], "cwd": "", "env_keys": []}
    assert change["to"] == {
        "command": ["node", "agent.js"],
        "cwd": "/opt/agent",
        "env_keys": ["TOKEN"],
    }
    assert change["env_keys_changed"] == ["TOKEN"]
    assert "hunter2-secret" not in json.dumps(change)


async def test_reserved_env_key_refused_on_update(owner: Clients, worker: agents_pb2.Agent) -> None:
    config = agents_pb2.AdapterConfig(command=["run"], env={"PAPERCLIP_AGENT_ID": "forged"})
    error = await expect_error(
        owner.runs.UpdateAgent(update_request(worker.id, ["adapter_config"], adapter_config=config))
    )
    assert fields_of(error) == ["agent.adapter_config.env"]


async def test_bad_update_on_every_field_writes_nothing(
    suite: Suite, owner: Clients, worker: agents_pb2.Agent
) -> None:
    request = update_request(
        worker.id,
        ["name", "role", "status", "adapter_config", "runtime_config"],
        name="no spaces allowed",
        role="r" * 101,
        status=agents_pb2.AGENT_STATUS_UNSPECIFIED,
        adapter_config=agents_pb2.AdapterConfig(cwd="rel"),
        runtime_config=agents_pb2.RuntimeConfig(max_concurrent_runs=101, grace_seconds=0),
    )
    audit_before = await count_rows(suite.db, "audit.activity_log")
    error = await expect_error(owner.runs.UpdateAgent(request))
    assert error.code is INVALID
    assert fields_of(error) == [
        "agent.name",
        "agent.role",
        "agent.status",
        "agent.adapter_config.command",
        "agent.adapter_config.cwd",
        "agent.runtime_config.max_concurrent_runs",
        "agent.runtime_config.grace_seconds",
    ]
    fetched = await owner.runs.GetAgent(agents_pb2.GetAgentRequest(agent_id=worker.id))
    assert fetched == worker
    assert await count_rows(suite.db, "audit.activity_log") == audit_before


# --- name and role -----------------------------------------------------------------------


async def test_rename_records_previous_name(
    suite: Suite, owner: Clients, worker: agents_pb2.Agent
) -> None:
    updated = await owner.runs.UpdateAgent(
        update_request(worker.id, ["name", "role"], name=" Builder ", role="builder")
    )
    assert (updated.name, updated.role) == ("Builder", "builder")
    assert updated.updated_at.ToDatetime() > worker.updated_at.ToDatetime()
    rows = await audit_rows(suite.db, worker.id)
    assert rows[-1]["action"] == "agent.updated"
    assert rows[-1]["details"] == {
        "changes": {
            "name": {"from": "Worker", "to": "Builder"},
            "role": {"from": "engineer", "to": "builder"},
        }
    }


async def test_rename_to_a_taken_name_is_already_exists(
    owner: Clients, company_id: str, worker: agents_pb2.Agent
) -> None:
    await owner.runs.CreateAgent(process_agent(company_id, "Taken"))
    error = await expect_error(
        owner.runs.UpdateAgent(update_request(worker.id, ["name"], name="TAKEN"))
    )
    assert (error.code, error.reason) == (grpc.StatusCode.ALREADY_EXISTS, "AGENT_NAME_TAKEN")
    fetched = await owner.runs.GetAgent(agents_pb2.GetAgentRequest(agent_id=worker.id))
    assert fetched.name == "Worker"


async def test_rename_may_change_the_case_of_its_own_name(
    owner: Clients, worker: agents_pb2.Agent
) -> None:
    updated = await owner.runs.UpdateAgent(update_request(worker.id, ["name"], name="WORKER"))
    assert updated.name == "WORKER"


async def test_concurrent_renames_to_one_name_let_one_win(owner: Clients, company_id: str) -> None:
    agents = [
        await owner.runs.CreateAgent(process_agent(company_id, f"renamer-{i}")) for i in range(4)
    ]
    results = await asyncio.gather(
        *(owner.runs.UpdateAgent(update_request(a.id, ["name"], name="Winner")) for a in agents),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, agents_pb2.Agent)]
    lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(won) == 1
    assert {e.code() for e in lost} == {grpc.StatusCode.ALREADY_EXISTS}


# --- who may -----------------------------------------------------------------------------


async def test_agent_cannot_update_agent(
    suite: Suite, company_id: str, worker: agents_pb2.Agent
) -> None:
    itself = suite.clients(agent(worker.id, company_id, str(uuid.uuid4())))
    error = await expect_error(set_status(itself, worker.id, PAUSED))
    assert (error.code, error.reason) == (DENIED, "BOARD_REQUIRED")


async def test_viewer_cannot_update_agent(
    suite: Suite, owner: Clients, company_id: str, worker: agents_pb2.Agent
) -> None:
    viewer = suite.clients(board(company_id, Role.VIEWER, user_id="viewer"))
    error = await expect_error(set_status(viewer, worker.id, PAUSED))
    assert (error.code, error.reason) == (DENIED, "COMPANY_ACCESS_DENIED")
    fetched = await owner.runs.GetAgent(agents_pb2.GetAgentRequest(agent_id=worker.id))
    assert fetched.status == ACTIVE


async def test_board_of_another_company_cannot_update_agent(
    suite: Suite, admin_clients: Clients, worker: agents_pb2.Agent
) -> None:
    other = (await new_company(admin_clients)).id
    outsider = suite.clients(board(other, Role.ADMIN, user_id="outsider"))
    error = await expect_error(set_status(outsider, worker.id, TERMINATED))
    assert (error.code, error.reason) == (DENIED, "COMPANY_ACCESS_DENIED")


async def test_update_of_missing_agent_is_not_found(owner: Clients) -> None:
    error = await expect_error(set_status(owner, str(uuid.uuid4()), PAUSED))
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "AGENT_NOT_FOUND")


@pytest.mark.parametrize("agent_id", ["", "not-a-uuid"])
async def test_update_with_malformed_id_is_invalid(owner: Clients, agent_id: str) -> None:
    error = await expect_error(set_status(owner, agent_id, PAUSED))
    assert error.code is INVALID
    assert fields_of(error) == ["agent.id"]
