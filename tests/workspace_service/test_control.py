"""ControlRuntimeServices: every check in order with its code and reason
and nothing written; start, stop and restart of real services; jobs run as nested
operations; the desired state written per §4.7 (scenarios 6, 26, 27)."""

from __future__ import annotations

import json
import sys
import tempfile
import urllib.request
import uuid
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from sqlalchemy import text

from paperclip.workspaces.v1 import workspace_messages_pb2 as messages
from paperclip.workspaces.v1 import workspaces_pb2 as pb
from tests.harness import Suite, expect_error, fetch_value
from tests.workspace_service.support import (
    WorkspaceWorld,
    insert_workspace,
    mark_closed,
    service_config,
    workspace_world,
)

START = pb.RUNTIME_ACTION_START
STOP = pb.RUNTIME_ACTION_STOP
RESTART = pb.RUNTIME_ACTION_RESTART
RUN = pb.RUNTIME_ACTION_RUN
RUNNING = messages.RUNTIME_SERVICE_STATUS_RUNNING


def http_service(name: str) -> dict[str, Any]:
    """A real HTTP server on a reserved port, ready when it answers."""
    return {
        "name": name,
        "command": f"exec {sys.executable} -m http.server $PORT --bind 127.0.0.1",
        "auto_port": True,
        "url": "http://127.0.0.1:{{port}}/",
        "readiness": {"timeout_seconds": 20, "interval_ms": 100},
    }


async def _workspace(world: WorkspaceWorld, config: dict[str, Any] | None, **fields: Any) -> str:
    record = await insert_workspace(
        world.db,
        world.company_id,
        cwd=tempfile.mkdtemp(prefix="paperclip-control-"),
        config=config,
        source_issue_id=world.issue_id,
        **fields,
    )
    return record.id


def _request(workspace_id: str, action: int, **fields: Any) -> pb.ControlRuntimeServicesRequest:
    return pb.ControlRuntimeServicesRequest(workspace_id=workspace_id, action=action, **fields)  # type: ignore[arg-type]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _stored_config(workspace: messages.ExecutionWorkspace) -> dict[str, Any]:
    """The desired states of the workspace's config, as stored (``running`` ...)."""

    def name(state: int) -> str:
        return messages.DesiredState.Name(state).removeprefix("DESIRED_STATE_").lower()  # type: ignore[arg-type]

    config = workspace.config
    return {
        "desired_state": name(config.desired_state),
        "service_states": {str(i): name(s) for i, s in sorted(config.service_states.items())},
    }


async def test_checks_run_in_order_and_write_nothing(suite: Suite) -> None:
    world = await workspace_world(suite)
    config = service_config(http_service("web"), jobs=[{"name": "lint", "command": "true"}])
    ws = await _workspace(world, config)
    bare = await _workspace(world, None)
    closed = await _workspace(world, config)
    await mark_closed(world.db, closed)
    no_path = await _workspace(world, config)
    async with world.db.transaction() as conn:
        await conn.execute(
            text("UPDATE workspaces.execution_workspaces SET cwd = NULL WHERE id = :i"),
            {"i": no_path},
        )
    stranger = await world.other_agent()
    before = await world.counts()
    cases: list[tuple[Any, str, str]] = [
        (
            world.board.workspaces.ControlRuntimeServices(_request(ws, 0)),
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            world.board.workspaces.ControlRuntimeServices(_request(str(uuid.uuid4()), START)),
            "NOT_FOUND",
            "WORKSPACE_NOT_FOUND",
        ),
        (
            stranger.workspaces.ControlRuntimeServices(_request(ws, RESTART)),
            "PERMISSION_DENIED",
            "WORKSPACE_ACCESS_DENIED",
        ),
        (
            world.board.workspaces.ControlRuntimeServices(_request(closed, START)),
            "FAILED_PRECONDITION",
            "WORKSPACE_CLOSED",
        ),
        (
            world.board.workspaces.ControlRuntimeServices(_request(no_path, START)),
            "FAILED_PRECONDITION",
            "WORKSPACE_PATH_MISSING",
        ),
        (
            world.board.workspaces.ControlRuntimeServices(
                _request(ws, START, workspace_command_id="nope")
            ),
            "NOT_FOUND",
            "WORKSPACE_COMMAND_NOT_FOUND",
        ),
        (
            world.board.workspaces.ControlRuntimeServices(
                _request(ws, STOP, runtime_service_id=str(uuid.uuid4()))
            ),
            "NOT_FOUND",
            "RUNTIME_SERVICE_NOT_FOUND",
        ),
        (
            world.board.workspaces.ControlRuntimeServices(_request(ws, START, service_index=3)),
            "FAILED_PRECONDITION",
            "RUNTIME_SERVICE_NOT_DEFINED",
        ),
        (
            world.board.workspaces.ControlRuntimeServices(
                _request(ws, START, workspace_command_id="job:lint")
            ),
            "FAILED_PRECONDITION",
            "WORKSPACE_COMMAND_ACTION_MISMATCH",
        ),
        (
            world.board.workspaces.ControlRuntimeServices(
                _request(ws, RUN, workspace_command_id="service:web")
            ),
            "FAILED_PRECONDITION",
            "WORKSPACE_COMMAND_ACTION_MISMATCH",
        ),
        (
            world.board.workspaces.ControlRuntimeServices(_request(ws, RUN)),
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            world.board.workspaces.ControlRuntimeServices(_request(bare, START)),
            "FAILED_PRECONDITION",
            "WORKSPACE_RUNTIME_NOT_CONFIGURED",
        ),
    ]
    for call, code, reason in cases:
        error = await expect_error(call)
        assert (error.code.name, error.reason) == (code, reason), error.message
    assert await world.counts() == before


async def test_scenario_6_an_agent_without_a_linked_open_issue_is_denied(suite: Suite) -> None:
    world = await workspace_world(suite)
    ws = await _workspace(world, service_config(http_service("web")))
    await world.set_issue_status("cancelled")
    error = await expect_error(world.agent.workspaces.ControlRuntimeServices(_request(ws, RESTART)))
    assert error.message == "Missing permission to manage workspace runtime services"


async def test_scenario_26_start_by_index_and_stop_by_record(suite: Suite) -> None:
    world = await workspace_world(suite)
    ws = await _workspace(world, service_config(http_service("web"), http_service("worker")))
    started = await world.agent.workspaces.ControlRuntimeServices(
        _request(ws, START, service_index=1)
    )
    assert [(s.service_name, s.status) for s in started.workspace.runtime_services] == [
        ("worker", RUNNING)
    ]
    assert started.operation.status == messages.OPERATION_STATUS_SUCCEEDED
    assert "Started execution workspace runtime services." in started.operation.stdout
    assert _stored_config(started.workspace)["service_states"] == {"0": "stopped", "1": "running"}
    both = await world.board.workspaces.ControlRuntimeServices(_request(ws, START))
    services = {s.service_name: s for s in both.workspace.runtime_services}
    assert {name: s.status for name, s in services.items()} == {"web": RUNNING, "worker": RUNNING}
    assert services["web"].port != services["worker"].port
    assert all(_answers(s.url) for s in services.values())
    stopped = await world.board.workspaces.ControlRuntimeServices(
        _request(ws, STOP, runtime_service_id=services["web"].id)
    )
    after = {s.service_name: s.status for s in stopped.workspace.runtime_services}
    assert after == {"web": messages.RUNTIME_SERVICE_STATUS_STOPPED, "worker": RUNNING}
    assert not _answers(services["web"].url) and _answers(services["worker"].url)
    # Named by its record only: the desired state is left alone.
    assert _stored_config(stopped.workspace)["service_states"] == {"0": "running", "1": "running"}
    restarted = await world.board.workspaces.ControlRuntimeServices(_request(ws, RESTART))
    assert {s.status for s in restarted.workspace.runtime_services} == {RUNNING}
    final = await world.board.workspaces.ControlRuntimeServices(_request(ws, STOP))
    assert {s.status for s in final.workspace.runtime_services} == {
        messages.RUNTIME_SERVICE_STATUS_STOPPED
    }
    assert _stored_config(final.workspace)["desired_state"] == "stopped"
    assert not any(_answers(s.url) for s in restarted.workspace.runtime_services)
    actions = await fetch_value(
        world.db,
        "SELECT string_agg(action, ',' ORDER BY created_at, id) FROM audit.activity_log"
        " WHERE entity_id = :w",
        w=ws,
    )
    assert actions.split(",") == [
        "execution_workspace.runtime_start",
        "execution_workspace.runtime_start",
        "execution_workspace.runtime_stop",
        "execution_workspace.runtime_restart",
        "execution_workspace.runtime_stop",
    ]


async def test_a_job_runs_as_a_nested_operation(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = await workspace_world(suite)
    secret_probe = "PAPERCLIP_INTERNAL_KEY"
    jobs: list[dict[str, Any]] = [
        {
            "name": "report",
            "command": f"echo job-ran; echo ${{{secret_probe}:-clean}}; echo $GREETING",
            "env": {"GREETING": "hi from {{workspace.id}}"},
        },
        {"name": "broken", "command": "echo bad >&2; exit 7"},
    ]
    ws = await _workspace(world, service_config(jobs=jobs))
    monkeypatch.setenv(secret_probe, "must-not-leak")
    ran = await world.board.workspaces.ControlRuntimeServices(
        _request(ws, RUN, workspace_command_id="job:report")
    )
    assert ran.operation.status == messages.OPERATION_STATUS_SUCCEEDED
    nested_id = str(ran.operation.metadata["nestedOperationId"])
    nested = await world.board.workspaces.GetWorkspaceOperation(
        pb.GetWorkspaceOperationRequest(operation_id=nested_id)
    )
    assert nested.parent_operation_id == ran.operation.id
    assert nested.stdout == f"job-ran\nclean\nhi from {ws}\n"
    error = await expect_error(
        world.board.workspaces.ControlRuntimeServices(
            _request(ws, RUN, workspace_command_id="job:broken")
        )
    )
    assert (error.code.name, error.reason) == ("FAILED_PRECONDITION", "WORKSPACE_COMMAND_FAILED")
    assert error.metadata["exit_code"] == "7" and "bad" in error.message
    outer = await world.board.workspaces.GetWorkspaceOperation(
        pb.GetWorkspaceOperationRequest(operation_id=error.metadata["operation_id"])
    )
    assert outer.status == messages.OPERATION_STATUS_FAILED
    assert json.loads(json.dumps(MessageToDict(outer.metadata)))["action"] == "run"


async def test_a_failed_start_ends_failed_and_wants_the_service_stopped(suite: Suite) -> None:
    world = await workspace_world(suite)
    broken = {
        "name": "broken",
        "command": "echo cannot start >&2; exit 1",
        "auto_port": True,
        "url": "http://127.0.0.1:{{port}}/",
    }
    ws = await _workspace(world, service_config(broken))
    error = await expect_error(world.board.workspaces.ControlRuntimeServices(_request(ws, START)))
    assert error.reason == "RUNTIME_SERVICE_START_FAILED"
    assert "cannot start" in error.message
    got = await world.board.workspaces.GetExecutionWorkspace(pb.GetExecutionWorkspaceRequest(id=ws))
    assert [s.status for s in got.runtime_services] == [messages.RUNTIME_SERVICE_STATUS_FAILED]
    assert _stored_config(got)["desired_state"] == "stopped"
    op = await world.board.workspaces.GetWorkspaceOperation(
        pb.GetWorkspaceOperationRequest(operation_id=error.metadata["operation_id"])
    )
    assert op.status == messages.OPERATION_STATUS_FAILED
