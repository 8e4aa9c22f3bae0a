"""The operation recorder: one row per command, with status, exit code,
the kept tail of each stream behind a truncation marker, excerpts, sizes and digests;
failures, time limits and cancellation recorded, never left running."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile

import psutil
import pytest

from paperclip.workspaces.v1 import workspace_messages_pb2 as messages
from paperclip.workspaces.v1 import workspaces_pb2 as pb
from tests.conftest import Services
from tests.harness import Suite, admin, fetch_value, new_company
from tests.waiting import wait_until
from tests.workspace_service.support import insert_workspace
from workspace_service.environment import sanitized_env
from workspace_service.output_tail import TAIL_BYTES
from workspace_service.recorder import CommandFailedError, Recorder


async def _recorder(suite: Suite, services: Services) -> tuple[Recorder, str, str]:
    clients = suite.clients(admin())
    company = await new_company(clients)
    workspace = await insert_workspace(suite.db, company.id, cwd=tempfile.mkdtemp())
    recorder = services.workspace.recorder(
        admin(), company_id=company.id, workspace_id=workspace.id
    )
    return recorder, company.id, workspace.id


async def _operation(suite: Suite, operation_id: str) -> messages.WorkspaceOperation:
    return await suite.clients(admin()).workspaces.GetWorkspaceOperation(
        pb.GetWorkspaceOperationRequest(operation_id=operation_id)
    )


async def test_a_command_is_recorded_with_its_output(suite: Suite, services: Services) -> None:
    recorder, _, workspace_id = await _recorder(suite, services)
    op = await recorder.run_command(
        "workspace_provision",
        "echo hello; echo oops >&2; exit 3",
        cwd="/tmp",
        env=sanitized_env(),
        timeout=30,
    )
    got = await _operation(suite, op.id)
    assert got.workspace_id == workspace_id
    assert got.status == messages.OPERATION_STATUS_FAILED
    assert got.exit_code == 3
    assert (got.stdout, got.stderr) == ("hello\n", "oops\n")
    assert (got.stdout_excerpt, got.stderr_excerpt) == ("hello\n", "oops\n")
    assert got.stdout_bytes == 6
    assert got.stdout_sha256 == hashlib.sha256(b"hello\n").hexdigest()
    assert got.phase == "workspace_provision" and got.actor_type == "user"
    assert got.HasField("finished_at")


async def test_output_keeps_the_last_256_kib_behind_a_marker(
    suite: Suite, services: Services
) -> None:
    recorder, _, _ = await _recorder(suite, services)
    total = 1024 * 1024 + 17
    op = await recorder.run_command(
        "workspace_provision",
        f"head -c {total} /dev/zero | tr '\\0' 'a'",
        cwd="/tmp",
        env=sanitized_env(),
        timeout=30,
    )
    got = await _operation(suite, op.id)
    assert got.status == messages.OPERATION_STATUS_SUCCEEDED
    marker = f"[output truncated to last {TAIL_BYTES} bytes; total {total} bytes]\n"
    assert got.stdout.startswith(marker)
    assert got.stdout[len(marker) :] == "a" * TAIL_BYTES
    assert got.stdout_bytes == total
    assert got.stdout_sha256 == hashlib.sha256(b"a" * total).hexdigest()
    assert got.stdout_excerpt == "a" * 4096


async def test_a_command_over_its_time_limit_is_stopped_and_failed(
    suite: Suite, services: Services
) -> None:
    recorder, _, _ = await _recorder(suite, services)
    marker = f"paperclip-recorder-{os.getpid()}-timeout"
    op = await recorder.run_command(
        "workspace_provision",
        f"sleep 300 & sleep 301; : {marker}",
        cwd="/tmp",
        env=sanitized_env(),
        timeout=0.5,
    )
    got = await _operation(suite, op.id)
    assert got.status == messages.OPERATION_STATUS_FAILED
    assert "timed out after 0.5 s" in got.stderr
    assert not _processes_with(marker)


async def test_check_raises_after_recording(suite: Suite, services: Services) -> None:
    recorder, _, _ = await _recorder(suite, services)
    with pytest.raises(CommandFailedError) as caught:
        await recorder.run_command(
            "workspace_teardown", "exit 9", cwd="/tmp", env=sanitized_env(), timeout=30, check=True
        )
    got = await _operation(suite, caught.value.operation.id)
    assert got.status == messages.OPERATION_STATUS_FAILED and got.exit_code == 9


async def test_a_cancelled_command_is_stopped_and_recorded_failed(
    suite: Suite, services: Services
) -> None:
    recorder, _, workspace_id = await _recorder(suite, services)
    marker = f"paperclip-recorder-{os.getpid()}-cancel"
    task = asyncio.create_task(
        recorder.run_command(
            "workspace_provision",
            f"sleep 300; : {marker}",
            cwd="/tmp",
            env=sanitized_env(),
            timeout=60,
        )
    )
    await wait_until(lambda: bool(_processes_with(marker)), what="the command to start")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not _processes_with(marker)
    status = await fetch_value(
        suite.db,
        "SELECT status FROM workspaces.workspace_operations WHERE workspace_id = :w",
        w=workspace_id,
    )
    assert status == "failed"


async def test_an_exception_in_an_operation_marks_it_failed(
    suite: Suite, services: Services
) -> None:
    recorder, _, _ = await _recorder(suite, services)
    with pytest.raises(RuntimeError):
        async with recorder.operation("worktree_prepare", "git worktree add") as op:
            op.note("preparing")
            raise RuntimeError("disk full")
    got = await _operation(suite, op.id)
    assert got.status == messages.OPERATION_STATUS_FAILED
    assert got.stdout == "preparing\n" and got.stderr == "disk full\n"


async def test_operations_recorded_before_the_workspace_existed_are_attached(
    suite: Suite, services: Services
) -> None:
    clients = suite.clients(admin())
    company = await new_company(clients)
    recorder = services.workspace.recorder(admin(), company_id=company.id)
    op = await recorder.run_command(
        "worktree_prepare", "true", cwd="/tmp", env=sanitized_env(), timeout=30
    )
    workspace = await insert_workspace(suite.db, company.id, cwd=tempfile.mkdtemp())
    await recorder.attach_workspace(workspace.id)
    assert (await _operation(suite, op.id)).workspace_id == workspace.id


def _processes_with(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in proc.info["cmdline"] or ()):
            found.append(proc)
    return found
