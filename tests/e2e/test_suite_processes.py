"""The suite started the way ``make run`` starts it: the launcher, embedded PostgreSQL,
each service its own process. Health and reflection are checked with grpcurl, then a
checkout flow runs over real sockets, then SIGTERM stops everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from common.actor import Actor, ActorType, sign_actor
from paperclip.issues.v1 import issues_pb2, issues_pb2_grpc
from paperclip.runs.v1 import agents_pb2, runs_pb2_grpc
from tests.harness import unique_prefix

pytestmark = pytest.mark.e2e

GRPCURL = str(Path(sys.executable).with_name("grpcurl"))
KEY = uuid.uuid4().hex


class RunningSuite:
    def __init__(self, proc: subprocess.Popen[bytes], services: dict[str, str], home: Path):
        self.proc = proc
        self.services = services
        self.home = home


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def running_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSuite]:
    home = tmp_path_factory.mktemp("home")
    ready = home / "suite.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAPERCLIP_")}
    env.update(
        PAPERCLIP_HOME=str(home),
        PAPERCLIP_READY_FILE=str(ready),
        PAPERCLIP_INTERNAL_KEY=KEY,
        PAPERCLIP_GATEWAY_ADDR="127.0.0.1:0",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "local_suite.launcher"],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            output = proc.stdout.read().decode() if proc.stdout else ""
            pytest.fail(f"the suite did not start:\n{output[-3000:]}")
        time.sleep(0.1)
    services = json.loads(ready.read_text())["services"]
    suite = RunningSuite(proc, services, home)
    yield suite
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_every_service_reports_serving_to_grpcurl(running_suite: RunningSuite) -> None:
    for address in running_suite.services.values():
        result = _grpcurl(address, "grpc.health.v1.Health/Check")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["status"] == "SERVING"


def test_reflection_lists_and_describes_the_services(running_suite: RunningSuite) -> None:
    issue_addr = running_suite.services["issue_service"]
    listed = _grpcurl(issue_addr, "list")
    assert listed.returncode == 0, listed.stderr
    assert "paperclip.issues.v1.IssueService" in listed.stdout.split()
    assert "paperclip.issues.v1.IssueLockService" in listed.stdout.split()
    described = _grpcurl(issue_addr, "describe", "paperclip.issues.v1.IssueService")
    assert described.returncode == 0, described.stderr
    assert "rpc CheckoutIssue" in described.stdout
    message = _grpcurl(issue_addr, "describe", "paperclip.issues.v1.CheckoutIssueRequest")
    assert "expected_statuses" in message.stdout
    runs = _grpcurl(running_suite.services["run_service"], "list")
    assert "paperclip.runs.v1.RunService" in runs.stdout.split()


def test_unsigned_grpcurl_call_is_unauthenticated(running_suite: RunningSuite) -> None:
    result = _grpcurl(
        "-d",
        "{}",
        running_suite.services["issue_service"],
        "paperclip.issues.v1.IssueService/ListCompanies",
    )
    assert result.returncode != 0
    assert "Unauthenticated" in result.stderr
    assert "UNAUTHENTICATED" in result.stderr


def test_signed_grpcurl_call_decodes_error_details(running_suite: RunningSuite) -> None:
    admin = Actor(type=ActorType.BOARD, user_id="ops", is_instance_admin=True)
    headers = [
        arg for key, value in sign_actor(admin, KEY.encode()) for arg in ("-H", f"{key}: {value}")
    ]
    result = _grpcurl(
        *headers,
        "-d",
        json.dumps({"company_id": str(uuid.uuid4())}),
        running_suite.services["issue_service"],
        "paperclip.issues.v1.IssueService/GetCompany",
    )
    assert result.returncode != 0
    assert "NotFound" in result.stderr
    assert "COMPANY_NOT_FOUND" in result.stderr


def _metadata(actor: Actor) -> tuple[tuple[str, str], ...]:
    return sign_actor(actor, KEY.encode())


async def test_checkout_flow_across_processes(running_suite: RunningSuite) -> None:
    admin = Actor(type=ActorType.BOARD, user_id="ops", is_instance_admin=True)
    async with (
        grpc.aio.insecure_channel(running_suite.services["issue_service"]) as ic,
        grpc.aio.insecure_channel(running_suite.services["run_service"]) as rc,
    ):
        issues = issues_pb2_grpc.IssueServiceStub(ic)
        runs = runs_pb2_grpc.RunServiceStub(rc)
        company = await issues.CreateCompany(
            issues_pb2.CreateCompanyRequest(name="E2E", issue_prefix=unique_prefix()),
            metadata=_metadata(admin),
        )
        bot = await runs.CreateAgent(
            agents_pb2.CreateAgentRequest(
                company_id=company.id,
                name="builder",
                adapter_type="process",
                adapter_config=agents_pb2.AdapterConfig(command=["true"]),
            ),
            metadata=_metadata(admin),
        )
        issue = await issues.CreateIssue(
            issues_pb2.CreateIssueRequest(
                company_id=company.id,
                # Unassigned: an assignment would wake the agent and its run would
                # check the issue out first (covered by test_agent_run.py).
                title="ship it",
                status=issues_pb2.ISSUE_STATUS_TODO,
            ),
            metadata=_metadata(admin),
        )
        me = Actor(
            type=ActorType.AGENT, agent_id=bot.id, company_id=company.id, run_id=str(uuid.uuid4())
        )
        out = await issues.CheckoutIssue(
            issues_pb2.CheckoutIssueRequest(
                issue_id=issue.id, agent_id=bot.id, expected_statuses=[issues_pb2.ISSUE_STATUS_TODO]
            ),
            metadata=_metadata(me),
        )
        assert out.status == issues_pb2.ISSUE_STATUS_IN_PROGRESS
        assert out.checkout_run_id == me.run_id
        await issues.AddComment(
            issues_pb2.AddCommentRequest(issue_id=issue.id, body="done soon"),
            metadata=_metadata(me),
        )
        released = await issues.ForceReleaseIssue(
            issues_pb2.ForceReleaseIssueRequest(issue_id=issue.id, clear_assignee=True),
            metadata=_metadata(admin),
        )
        assert released.previous_checkout_run_id == me.run_id
        assert not released.issue.assignee_agent_id
        trail = await issues.ListActivity(
            issues_pb2.ListActivityRequest(
                company_id=company.id, entity_type="issue", entity_id=issue.id
            ),
            metadata=_metadata(admin),
        )
        actions = [entry.action for entry in trail.entries]
        assert actions[:3] == [
            "issue.admin_force_release",
            "issue.comment_added",
            "issue.checked_out",
        ]


def test_sigterm_stops_every_process_and_postgres(running_suite: RunningSuite) -> None:
    proc = running_suite.proc
    children = _descendants(proc.pid)
    assert children, "the launcher should have child processes"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    time.sleep(0.5)
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    pgdata = str(running_suite.home / "pgdata")
    leftover = [
        p
        for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] == "postgres" and pgdata in " ".join(p.info["cmdline"] or ())
    ]
    assert leftover == []
