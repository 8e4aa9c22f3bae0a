"""Runtime-service logs rotated by size while the service keeps writing
(``workspace_service.retention.rotate_logs_forever``): a real service process
(``tests/agents/flood.py`` in a loop) floods its log; the log and its old files stay
bounded, the service never stops writing, and what it writes after a rotation lands at
the start of the truncated log."""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from common.config import Settings
from tests.conftest import Services
from tests.harness import admin, new_company
from tests.workspace_service.support import insert_workspace, service_config
from tests.workspace_service.test_runtime_services import new_op, service_of
from workspace_service import retention
from workspace_service.service_process import LOG_DIR

FLOOD = Path(__file__).resolve().parents[1] / "agents" / "flood.py"
MAX_BYTES = 2 * 1024 * 1024
KEEP = 2


async def test_a_flooding_service_log_is_rotated_by_size_while_it_writes(
    services: Services, settings: Settings, tmp_path: Path
) -> None:
    runtime = services.workspace.runtime
    company = (await new_company(services.suite.clients(admin()))).id
    flood = f"{shlex.quote(sys.executable)} {shlex.quote(str(FLOOD))} 1"
    service = {"name": "flood", "command": f"while :; do {flood}; sleep 0.05; done"}
    workspace = await insert_workspace(
        services.suite.db, company, cwd=str(tmp_path), config=service_config(service)
    )
    started = await runtime.start_service(workspace, service_of(workspace), op=new_op())
    log = Path(started.log_path or "")
    assert log.parent == settings.home / LOG_DIR
    rotation = replace(
        settings,
        retention_runtime_log_bytes=MAX_BYTES,
        retention_runtime_log_files=KEEP,
        retention_runtime_log_check_seconds=0.05,
    )
    job = asyncio.create_task(retention.rotate_logs_forever(rotation))
    largest = 0
    rotations = 0
    previous = 0
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            size = _size(log)
            largest = max(largest, size)
            rotations += size < previous
            previous = size
    finally:
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
    try:
        old = sorted(p.name for p in log.parent.glob(f"{log.name}.*"))
        assert old == [f"{log.name}.{i}" for i in range(1, KEEP + 1)]
        for index in range(1, KEEP + 1):
            # Each old file holds one log's worth: past the size, by at most what the
            # service wrote between two checks.
            assert MAX_BYTES < retention.rotated(log, index).stat().st_size < 4 * MAX_BYTES
        assert rotations >= 3
        assert largest < 4 * MAX_BYTES
        # Still writing, at the start of the truncated file (no hole of NUL bytes).
        before = _size(log)
        await asyncio.sleep(0.5)
        assert _size(log) > before
        assert b"\0" not in _head(log)
        assert (await runtime.stop_service(started, reason="test")).status == "stopped"
    finally:
        for path in log.parent.glob(f"{log.name}*"):
            path.unlink()


def _size(path: Path) -> int:
    return path.stat().st_size


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(4096)


def test_a_log_at_most_its_size_is_left_alone_and_zero_files_truncates(tmp_path: Path) -> None:
    log = tmp_path / "s.log"
    log.write_bytes(b"a" * 100)
    assert not retention.rotate_log(log, max_bytes=100, keep=3)
    log.write_bytes(b"b" * 101)
    assert retention.rotate_log(log, max_bytes=100, keep=0)
    assert log.stat().st_size == 0
    assert list(tmp_path.iterdir()) == [log]
    assert not retention.rotate_log(tmp_path / "missing.log", max_bytes=1, keep=1)
