"""Prometheus metrics under ``make run``: every process serves its own address, listed
in the banner and the ready file, with the suite's named series."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from paperclip_client import PaperclipClient

from paperclip.issues.v1 import issues_pb2
from paperclip.runs.v1 import agents_pb2, run_messages_pb2, runs_pb2
from tests.e2e.test_operator_flow import Launcher, _free_port

pytestmark = pytest.mark.e2e

AGENT = str(Path(__file__).parents[1] / "agents" / "succeed.py")
#: The series each process must serve (beyond the per-RPC ones every process has).
EXPECTED = {
    "issue_service": [
        'paperclip_lock_conflicts_total{reason="ISSUE_CHECKOUT_CONFLICT"}',
        'paperclip_sweep_seconds_count{sweep="issue_lock_sweep"}',
        "paperclip_database_up 1.0",
    ],
    "run_service": [
        "paperclip_runs_queued ",
        "paperclip_runs_running ",
        "paperclip_node_runs_running ",
        'paperclip_run_outcomes_total{error_code="",status="succeeded"}',
        'paperclip_sweep_seconds_count{sweep="run_recovery"}',
        'paperclip_sweep_seconds_count{sweep="run_reconcile"}',
        "paperclip_database_up 1.0",
    ],
    "workspace_service": [
        "paperclip_environment_leases_active ",
        'paperclip_sweep_seconds_count{sweep="workspace_lease_sweep"}',
    ],
    "gateway": ['paperclip_rpc_total{code="OK",method="/paperclip.runs.v1.RunService/GetRun"}'],
}


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    home = tmp_path / "home"
    home.mkdir()
    running = Launcher(
        home,
        f"127.0.0.1:{_free_port()}",
        tmp_path / "launcher.log",
        extra={"PAPERCLIP_LOCK_SWEEP_SECONDS": "1", "PAPERCLIP_LEASE_SWEEP_SECONDS": "1"},
    )
    try:
        running.wait_ready()
        yield running
    finally:
        running.kill()


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


async def test_every_process_serves_the_named_series(launcher: Launcher) -> None:
    ready = json.loads(launcher.ready.read_text())
    metrics = ready["metrics"]
    assert set(metrics) == set(ready["services"]) == set(EXPECTED)
    banner = launcher.output()
    for address in metrics.values():
        assert f"http://{address}/metrics" in banner

    token = (launcher.home / "board-token").read_text().strip()
    async with PaperclipClient(launcher.gateway, token) as client:
        company = await client.issues.CreateCompany(issues_pb2.CreateCompanyRequest(name="M"))
        agent = await client.runs.CreateAgent(
            agents_pb2.CreateAgentRequest(
                company_id=company.id,
                name=f"metrics-{uuid.uuid4().hex[:6]}",
                adapter_type="process",
                adapter_config=agents_pb2.AdapterConfig(command=[sys.executable, AGENT]),
            )
        )
        woken = await client.runs.WakeAgent(
            runs_pb2.WakeAgentRequest(
                agent_id=agent.id, source=run_messages_pb2.WAKE_SOURCE_ON_DEMAND
            )
        )
        deadline = time.monotonic() + 60
        while True:
            run = await client.runs.GetRun(runs_pb2.GetRunRequest(run_id=woken.run.id))
            if run.status == run_messages_pb2.RUN_STATUS_SUCCEEDED:
                break
            assert time.monotonic() < deadline, run
            await asyncio.sleep(0.2)

    deadline = time.monotonic() + 60
    while True:
        missing = {
            service: [s for s in series if s not in _scrape(metrics[service])]
            for service, series in EXPECTED.items()
        }
        missing = {k: v for k, v in missing.items() if v}
        if not missing:
            return
        assert time.monotonic() < deadline, missing
        await asyncio.sleep(0.5)
