"""The client distribution (issue 10, "An installable client package"): ``make dist``
builds ``paperclip_client-*.whl``; it installs into a fresh virtualenv with only its own
dependencies (none of the services' packages is importable there), and an agent run by
that virtualenv's Python, using only the wheel, does its issue's work under the run
service through the gateway."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.actor import Role
from paperclip.issues.v1 import issues_pb2
from run_service.runner import Runner
from tests.conftest import Services
from tests.e2e.test_agent_run import gateway_addr  # noqa: F401 - the fixture
from tests.harness import admin, board, new_company
from tests.run_service.test_runner import AGENTS, create_agent, queue_run, run_events, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[2]
#: Importable in the client's virtualenv: the client and the stubs; not: the services.
PROBE = """
import importlib.util, json
print(json.dumps({
    name: importlib.util.find_spec(name) is not None
    for name in ("paperclip_client", "paperclip.issues.v1.issues_pb2", "grpc",
                 "common", "gateway", "issue_service", "run_service", "sqlalchemy")
}))
"""


@pytest.fixture(scope="module")
def client_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Python of a fresh virtualenv holding the wheel ``make dist`` built."""
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        ["make", "--no-print-directory", "dist", f"DIST={dist}"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("paperclip_client-*.whl")
    venv = tmp_path_factory.mktemp("client-venv")
    subprocess.run(
        [getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)],
        check=True,
        timeout=120,
    )
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    return python


def test_the_wheel_brings_the_client_and_stubs_and_nothing_of_the_services(
    client_python: Path,
) -> None:
    found = subprocess.run(
        [str(client_python), "-c", PROBE],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd="/",
    )
    assert json.loads(found.stdout) == {
        "paperclip_client": True,
        "paperclip.issues.v1.issues_pb2": True,
        "grpc": True,
        "common": False,
        "gateway": False,
        "issue_service": False,
        "run_service": False,
        "sqlalchemy": False,
    }


async def test_an_agent_using_only_the_wheel_runs_under_the_run_service(
    services: Services,
    runner: Runner,
    gateway_addr: str,  # noqa: F811 - the fixture
    client_python: Path,
) -> None:
    suite = services.suite
    db = suite.db
    company = (await new_company(suite.clients(admin()))).id
    owner = suite.clients(board(company, Role.ADMIN, user_id="owner"))
    agent = await create_agent(owner, company, [str(client_python), str(AGENTS / "worker.py")])
    issue = await owner.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(
            company_id=company,
            title="work done with the installed client",
            status=issues_pb2.ISSUE_STATUS_TODO,
            assignee_agent_id=agent,
        )
    )
    assert runner.companies is not None
    runner.companies.add(company)
    try:
        run_id = await queue_run(
            db, company_id=company, agent_id=agent, issue_id=issue.id, reason="issue_assigned"
        )
        row = await wait_for(db, run_id, within=60)
    finally:
        runner.companies.discard(company)
    events = await run_events(db, run_id)
    assert row["status"] == "succeeded", (row["error"], [e["message"] for e in events])
    done = await owner.issues.GetIssue(issues_pb2.GetIssueRequest(issue=issue.id))
    assert done.status == issues_pb2.ISSUE_STATUS_DONE
