"""Two replicas of every backend behind one gateway, as separate processes on one
database (issue 9, "Past one machine").

Issue, run and workspace services each run twice (``python -m ...``, own port, own node
id); the run and workspace replicas of "host-a" and of "host-b" register those hosts.
One gateway names each backend as a list of both replicas. Calls go through the gateway
with the typed client.

1. Spread: 1,000 ``GetCompany`` calls with both issue replicas healthy; each replica's
   own metrics show it served between 30 % and 70 % of them.
2. Load through the gateway: reads (idempotent: every one must succeed), wakes with
   idempotency keys (retried on UNAVAILABLE), and board issue writes; agents with a
   limit of 2 concurrent runs record each start. During the load replica A of every
   service gets SIGTERM and is started again, then replica B of every service gets
   SIGKILL.
3. A workspace of host-b with a running runtime service: while host-b's workspace
   replica is dead, calls about it answer ``UNAVAILABLE`` / ``WORKSPACE_HOST_UNAVAILABLE``
   with the host in metadata; once it is started again they work and the service
   process was adopted (same pid, still running).
4. In the end: every call answered OK or a documented code, no run started twice, no
   wake left queued, claimed or deferred, no issue lock held by a finished run, and the
   per-agent limit never exceeded (sampled every 50 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from paperclip_client import PaperclipClient

from common.db import Database
from common.errors import PaperclipError
from gateway.keys import create_key
from paperclip.issues.v1 import issues_pb2
from paperclip.runs.v1 import agents_pb2, run_messages_pb2, runs_pb2
from paperclip.workspaces.v1 import workspace_messages_pb2, workspaces_pb2
from supervision import process_group
from tests.databases import fresh_database
from tests.e2e import service_processes
from tests.e2e.service_processes import rows, settled
from tests.harness import INTERNAL_KEY
from tests.waiting import wait_until
from tests.workspace_service.support import insert_workspace, service_config
from tests.workspace_service.test_runtime_services import MARKER as SERVER_MARKER
from tests.workspace_service.test_runtime_services import web

pytestmark = pytest.mark.e2e

_T = TypeVar("_T")

AGENTS = 4
ISSUES_PER_AGENT = 3
LIMIT = 2
RUN_SECONDS = "0.3"
SPREAD_CALLS = 1_000
MARKER = f"replicas-{uuid.uuid4().hex[:10]}"
GET_COMPANY = "/paperclip.issues.v1.IssueService/GetCompany"
#: What a non-idempotent call may answer while a replica dies under it: the call may or
#: may not have been applied, and the caller repeats it (with its idempotency key).
DOCUMENTED_UNAVAILABLE = {"UNAVAILABLE", "WORKSPACE_HOST_UNAVAILABLE"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Replica:
    """One service process on a fixed port (so a restart comes back at the same address)."""

    name: str
    module: str
    addr_env: str
    env: dict[str, str]
    home: Path
    port: int = field(default_factory=_free_port)
    metrics_port: int = field(default_factory=_free_port)
    child: process_group.Child | None = None
    starts: int = 0

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spawn(self) -> None:
        env = {
            **self.env,
            self.addr_env: self.addr,
            "PAPERCLIP_METRICS_ADDR": f"127.0.0.1:{self.metrics_port}",
        }
        ready = self.home / f"{self.name}-{self.starts}.json"
        self.starts += 1
        self.child = process_group.spawn(
            process_group.ProcessSpec(self.module, self.addr_env), env, ready
        )

    async def ready(self) -> None:
        assert self.child is not None
        child = self.child
        await asyncio.to_thread(
            process_group.wait_ready, child, timeout=60, stop_requested=lambda: False
        )

    async def start(self) -> None:
        self.spawn()
        await self.ready()

    def signal(self, sig: signal.Signals) -> None:
        assert self.child is not None
        self.child.process.send_signal(sig)

    async def wait_exit(self, within: float = 30.0) -> int:
        assert self.child is not None
        process = self.child.process
        try:
            return await asyncio.to_thread(process.wait, within)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not stop within {within} s") from None

    def rpc_count(self, method: str) -> float:
        """``paperclip_rpc_total`` of ``method`` (every code) from this replica's metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as reply:
            body = reply.read().decode()
        total = 0.0
        for line in body.splitlines():
            if line.startswith("paperclip_rpc_total{") and f'method="{method}"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        if self.child is not None and self.child.process.poll() is None:
            process_group.stop_all([self.child], grace=10)


class Cluster:
    """Two replicas of each backend and one gateway on one database."""

    def __init__(self, url: str, home: Path) -> None:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("PAPERCLIP_")}
        base = {
            **inherited,
            "PAPERCLIP_HOME": str(home),
            "PAPERCLIP_DATABASE_URL": url,
            "PAPERCLIP_INTERNAL_KEY": INTERNAL_KEY.decode(),
            "PAPERCLIP_JWT_SECRET": "replicas-test-jwt-secret-0123456789abcdef",
            "PAPERCLIP_DISPATCH_POLL_MS": "200",
            "PAPERCLIP_LOCK_SWEEP_SECONDS": "2",
            "PAPERCLIP_LOG_LEVEL": "WARNING",
        }
        self.home = home

        def replica(name: str, module: str, addr_env: str, **extra: str) -> Replica:
            directory = home / name
            directory.mkdir()
            return Replica(name, module, addr_env, {**base, **extra}, directory)

        self.issue = [
            replica(f"issue-{x}", "issue_service", "PAPERCLIP_ISSUE_SERVICE_ADDR") for x in "ab"
        ]
        self.workspace = [
            replica(
                f"workspace-{x}",
                "workspace_service",
                "PAPERCLIP_WORKSPACE_SERVICE_ADDR",
                PAPERCLIP_HOST=f"host-{x}",
            )
            for x in "ab"
        ]
        self.run = [
            replica(
                f"run-{x}", "run_service", "PAPERCLIP_RUN_SERVICE_ADDR", PAPERCLIP_HOST=f"host-{x}"
            )
            for x in "ab"
        ]
        self.gateway = replica("gateway", "gateway", "PAPERCLIP_GATEWAY_ADDR")
        lists = {
            "PAPERCLIP_ISSUE_SERVICE_ADDR": ",".join(r.addr for r in self.issue),
            "PAPERCLIP_RUN_SERVICE_ADDR": ",".join(r.addr for r in self.run),
            "PAPERCLIP_WORKSPACE_SERVICE_ADDR": ",".join(r.addr for r in self.workspace),
            "PAPERCLIP_GATEWAY_ADDR": self.gateway.addr,
        }
        for r in self.all:
            r.env.update(lists)
        for r in self.run:
            # Agents live under the host's own directory, as on separate machines.
            r.env["PAPERCLIP_HOME"] = str(r.home)
        for r, host in zip(self.workspace, self.run, strict=True):
            r.env["PAPERCLIP_HOME"] = str(host.home)

    @property
    def all(self) -> list[Replica]:
        return [*self.issue, *self.workspace, *self.run, self.gateway]

    async def start(self) -> None:
        for r in self.all:
            r.spawn()
        await asyncio.gather(*(r.ready() for r in self.all))

    def stop(self) -> None:
        for r in reversed(self.all):
            r.stop()


@pytest.fixture(scope="module")
async def replicas_db_url(server_url: str) -> AsyncIterator[str]:
    async with fresh_database(server_url, "paperclip_replicas") as url:
        yield url


@pytest.fixture
def cluster(replicas_db_url: str, tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(replicas_db_url, tmp_path)
    try:
        yield running
    finally:
        running.stop()
        service_processes.kill_agents(MARKER)
        service_processes.kill_agents(SERVER_MARKER)


async def test_replicas_behind_one_gateway_survive_sigterm_and_sigkill(
    replicas_db_url: str, cluster: Cluster, tmp_path: Path
) -> None:
    db = Database(replicas_db_url, pool_size=5, max_overflow=5, name="replicas-test")
    try:
        await cluster.start()
        token = await _board_token(db)
        async with PaperclipClient(cluster.gateway.addr, token) as client:
            await _scenario(db, cluster, client, tmp_path)
    finally:
        await db.dispose()


async def _board_token(db: Database) -> str:
    async with db.unit_of_work() as tx:
        _, secret = await create_key(
            tx, user_id="replicas-operator", name="replicas", is_instance_admin=True, memberships={}
        )
    return secret


class Outcomes:
    """Every answer the load saw, by method and code (or reason)."""

    def __init__(self) -> None:
        self.seen: Counter[tuple[str, str]] = Counter()
        self.failures: list[str] = []

    async def call(self, method: str, call: Awaitable[_T], *, idempotent: bool) -> _T | None:
        try:
            answer = await call
        except PaperclipError as err:
            self.seen[(method, err.reason)] += 1
            if idempotent or err.reason not in DOCUMENTED_UNAVAILABLE:
                self.failures.append(f"{method}: {err.code.name} {err.reason}: {err.message}")
            return None
        self.seen[(method, "OK")] += 1
        return answer


async def _scenario(
    db: Database, cluster: Cluster, client: PaperclipClient, tmp_path: Path
) -> None:
    company = await client.issues.CreateCompany(issues_pb2.CreateCompanyRequest(name="Replicas"))
    await _spread(cluster, client, company.id)

    starts = tmp_path / "starts.log"
    agents = [await _create_agent(client, company.id, starts) for _ in range(AGENTS)]
    issues_of = {
        agent: [await _create_issue(client, company.id, agent) for _ in range(ISSUES_PER_AGENT)]
        for agent in agents
    }
    workspace = await _hosted_workspace(db, client, company.id, cluster, tmp_path)

    outcomes = Outcomes()
    stop = asyncio.Event()
    most: dict[str, int] = dict.fromkeys(agents, 0)
    load = [
        asyncio.create_task(_reads(client, company.id, outcomes, stop)),
        asyncio.create_task(_reads(client, company.id, outcomes, stop)),
        asyncio.create_task(_wakes(client, issues_of, outcomes, stop)),
        asyncio.create_task(_issue_writes(client, company.id, outcomes, stop)),
        asyncio.create_task(_sample(db, company.id, most, stop)),
    ]
    try:
        await asyncio.sleep(2)
        # Replica A of every service: SIGTERM (a rolling restart), then back.
        a_side = [cluster.issue[0], cluster.workspace[0], cluster.run[0]]
        for r in a_side:
            r.signal(signal.SIGTERM)
        for r in a_side:
            assert await r.wait_exit() == 0, f"{r.name} did not stop cleanly on SIGTERM"
        await asyncio.gather(*(r.start() for r in a_side))
        await asyncio.sleep(2)

        # Replica B of every service: SIGKILL.
        b_side = [cluster.issue[1], cluster.workspace[1], cluster.run[1]]
        for r in b_side:
            r.signal(signal.SIGKILL)
        for r in b_side:
            await r.wait_exit()
        await _host_unavailable(client, workspace)
        await asyncio.sleep(2)
        await asyncio.gather(*(r.start() for r in b_side))
        await _host_back(client, workspace)
        await asyncio.sleep(2)
    finally:
        stop.set()
        await asyncio.gather(*load)

    assert not outcomes.failures, outcomes.failures[:10]
    assert outcomes.seen[("IssueService/GetCompany", "OK")] > 50, outcomes.seen
    assert (
        sum(n for (m, r), n in outcomes.seen.items() if m == "RunService/WakeAgent" and r == "OK")
        > 10
    )
    await settled(db, column="company_id", value=company.id, within=90)
    await _accounted(db, company.id, starts)
    assert max(most.values()) <= LIMIT, most


async def _spread(cluster: Cluster, client: PaperclipClient, company_id: str) -> None:
    """With both issue replicas healthy, each serves 30-70 % of 1,000 calls."""
    before = [r.rpc_count(GET_COMPANY) for r in cluster.issue]
    request = issues_pb2.GetCompanyRequest(company_id=company_id)
    for _ in range(SPREAD_CALLS // 10):
        await asyncio.gather(*(client.issues.GetCompany(request) for _ in range(10)))
    served = [r.rpc_count(GET_COMPANY) - b for r, b in zip(cluster.issue, before, strict=True)]
    assert sum(served) == SPREAD_CALLS, served
    for count in served:
        assert 0.3 * SPREAD_CALLS <= count <= 0.7 * SPREAD_CALLS, served


async def _create_agent(client: PaperclipClient, company_id: str, starts: Path) -> str:
    agent = await client.runs.CreateAgent(
        agents_pb2.CreateAgentRequest(
            company_id=company_id,
            name=f"agent-{uuid.uuid4().hex[:8]}",
            role="engineer",
            adapter_type="process",
            adapter_config=agents_pb2.AdapterConfig(
                command=[
                    sys.executable,
                    str(Path(__file__).parents[1] / "agents" / "record_start.py"),
                    str(starts),
                    RUN_SECONDS,
                    MARKER,
                ]
            ),
            runtime_config=agents_pb2.RuntimeConfig(max_concurrent_runs=LIMIT, grace_seconds=1),
        )
    )
    return agent.id


async def _create_issue(client: PaperclipClient, company_id: str, agent_id: str) -> str:
    issue = await client.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(
            company_id=company_id,
            title=f"Replica work {uuid.uuid4().hex[:6]}",
            assignee_agent_id=agent_id,
            status=issues_pb2.ISSUE_STATUS_TODO,
        )
    )
    return issue.id


async def _reads(
    client: PaperclipClient, company_id: str, outcomes: Outcomes, stop: asyncio.Event
) -> None:
    reads: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        (
            "IssueService/GetCompany",
            lambda: client.issues.GetCompany(issues_pb2.GetCompanyRequest(company_id=company_id)),
        ),
        (
            "IssueService/ListIssues",
            lambda: client.issues.ListIssues(issues_pb2.ListIssuesRequest(company_id=company_id)),
        ),
        (
            "RunService/ListRuns",
            lambda: client.runs.ListRuns(runs_pb2.ListRunsRequest(company_id=company_id)),
        ),
        (
            "RunService/ListAgents",
            lambda: client.runs.ListAgents(agents_pb2.ListAgentsRequest(company_id=company_id)),
        ),
        (
            "WorkspaceService/ListExecutionWorkspaces",
            lambda: client.workspaces.ListExecutionWorkspaces(
                workspaces_pb2.ListExecutionWorkspacesRequest(company_id=company_id)
            ),
        ),
    ]
    while not stop.is_set():
        for method, call in reads:
            await outcomes.call(method, call(), idempotent=True)
        await asyncio.sleep(0.01)


async def _wakes(
    client: PaperclipClient,
    issues_of: dict[str, list[str]],
    outcomes: Outcomes,
    stop: asyncio.Event,
) -> None:
    """Wakes on the agents' issues (and without one), each repeated with its key until it
    is answered: a wake whose first try died with a replica is not lost nor doubled."""
    chooser = random.Random(9)
    while not stop.is_set():
        agent = chooser.choice(list(issues_of))
        issue = chooser.choice([*issues_of[agent], ""])
        request = runs_pb2.WakeAgentRequest(
            agent_id=agent,
            source=run_messages_pb2.WAKE_SOURCE_ON_DEMAND,
            reason="replica_load",
            issue_id=issue,
            idempotency_key=str(uuid.uuid4()),
        )
        for _ in range(20):
            answer = await outcomes.call(
                "RunService/WakeAgent",
                client.runs.WakeAgent(request),
                idempotent=False,
            )
            if answer is not None:
                break
            await asyncio.sleep(0.2)
        else:
            outcomes.failures.append(f"wake {request.idempotency_key} never answered")
        await asyncio.sleep(0.05)


async def _issue_writes(
    client: PaperclipClient, company_id: str, outcomes: Outcomes, stop: asyncio.Event
) -> None:
    """Board writes that are not idempotent: create an issue, comment on it."""
    while not stop.is_set():
        request_id = str(uuid.uuid4())
        created = await outcomes.call(
            "IssueService/CreateIssue",
            client.issues.CreateIssue(
                issues_pb2.CreateIssueRequest(
                    company_id=company_id, title="Board note", request_id=request_id
                )
            ),
            idempotent=False,
        )
        if created is not None:
            await outcomes.call(
                "IssueService/AddComment",
                client.issues.AddComment(
                    issues_pb2.AddCommentRequest(issue_id=created.id, body="still here")
                ),
                idempotent=False,
            )
        await asyncio.sleep(0.1)


async def _sample(db: Database, company_id: str, most: dict[str, int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(PaperclipError):
            for row in await rows(
                db,
                """
                SELECT agent_id, count(*) AS running FROM runs.heartbeat_runs
                WHERE company_id = :c AND status = 'running' GROUP BY agent_id
                """,
                c=company_id,
            ):
                key = str(row["agent_id"])
                most[key] = max(most.get(key, 0), int(row["running"]))
        await asyncio.sleep(0.05)


@dataclass
class HostedWorkspace:
    id: str
    pid: int


async def _hosted_workspace(
    db: Database, client: PaperclipClient, company_id: str, cluster: Cluster, tmp_path: Path
) -> HostedWorkspace:
    """A workspace of host-b with its runtime service started through the gateway."""
    cwd = tmp_path / "hosted"
    cwd.mkdir()
    record = await insert_workspace(db, company_id, cwd=str(cwd), config=service_config(web()))
    await rows(
        db,
        "UPDATE workspaces.execution_workspaces SET host = 'host-b' WHERE id = :i RETURNING id",
        i=record.id,
    )
    answer = await client.workspaces.ControlRuntimeServices(
        workspaces_pb2.ControlRuntimeServicesRequest(
            workspace_id=record.id, action=workspaces_pb2.RUNTIME_ACTION_START
        )
    )
    services = answer.workspace.runtime_services
    assert len(services) == 1, answer
    service = services[0]
    assert service.host == "host-b", service
    assert service.status == workspace_messages_pb2.RUNTIME_SERVICE_STATUS_RUNNING, service
    return HostedWorkspace(record.id, service.pid)


async def _host_unavailable(client: PaperclipClient, workspace: HostedWorkspace) -> None:
    """host-b's workspace replica is dead: its workspace's calls say so, with the host."""
    for call in (
        lambda: client.workspaces.GetCloseReadiness(
            workspaces_pb2.GetCloseReadinessRequest(workspace_id=workspace.id)
        ),
        lambda: client.workspaces.ControlRuntimeServices(
            workspaces_pb2.ControlRuntimeServicesRequest(
                workspace_id=workspace.id, action=workspaces_pb2.RUNTIME_ACTION_RESTART
            )
        ),
    ):
        with pytest.raises(PaperclipError) as caught:
            await call()
        err = caught.value
        assert err.code is grpc.StatusCode.UNAVAILABLE, err
        assert err.reason == "WORKSPACE_HOST_UNAVAILABLE", err
        assert err.metadata.get("host") == "host-b", err.metadata


async def _host_back(client: PaperclipClient, workspace: HostedWorkspace) -> None:
    """host-b's replica is back: it adopted the service process, and calls work."""
    readiness = await client.workspaces.GetCloseReadiness(
        workspaces_pb2.GetCloseReadinessRequest(workspace_id=workspace.id)
    )
    assert readiness.workspace_id == workspace.id

    async def adopted() -> bool:
        listed = await client.workspaces.ListRuntimeServices(
            workspaces_pb2.ListRuntimeServicesRequest(workspace_id=workspace.id)
        )
        (service,) = listed.services
        running = service.status == workspace_messages_pb2.RUNTIME_SERVICE_STATUS_RUNNING
        return running and service.pid == workspace.pid

    await wait_until(adopted, within=15, what="the runtime service adopted by host-b")
    os.kill(workspace.pid, 0)  # the same process, alive all along


async def _accounted(db: Database, company_id: str, starts: Path) -> None:
    """No run started twice; a run that succeeded started exactly once; no lock is left
    with a finished run."""
    text = await asyncio.to_thread(starts.read_text)
    started = Counter(line.split()[1] for line in text.splitlines())
    doubled = {run: n for run, n in started.items() if n > 1}
    assert not doubled, doubled
    runs = await rows(
        db,
        "SELECT id, status, error_code FROM runs.heartbeat_runs WHERE company_id = :c",
        c=company_id,
    )
    assert runs
    succeeded = [str(r["id"]) for r in runs if r["status"] == "succeeded"]
    assert succeeded
    assert all(started[run] == 1 for run in succeeded), [r for r in succeeded if started[r] != 1]

    # Locks of runs whose node was killed mid-release are freed by the issue service's
    # stale-lock sweep (every 2 s here): none may stay.
    async def released() -> bool:
        held = await rows(
            db,
            """
            SELECT i.id FROM issues.issues i
            WHERE i.company_id = :c
              AND (i.checkout_run_id IS NOT NULL OR i.execution_run_id IS NOT NULL)
            """,
            c=company_id,
        )
        return not held

    await wait_until(released, within=20, what="every issue lock released")
    statuses = Counter(str(r["status"]) for r in runs)
    assert set(statuses) <= {"succeeded", "cancelled", "failed"}, statuses
