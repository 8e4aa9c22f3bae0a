"""``paperclip status``: the suite at a glance, from public RPCs only.

- Health of every service as the gateway's health service reports it: the gateway
  itself (``paperclip.gateway``), the suite as a whole (``""``) and each public service,
  which follows its backend.
- Queue depth (queued runs) and running runs per agent, in every company the token sees.
- Stranded issues: assigned to an active agent, ``todo`` or ``in_progress``, with no
  queued or running run, whose latest run says nothing will move them on (the run
  service's reconcile rule: a ``todo`` issue whose latest run failed, or an
  ``in_progress`` one with any latest run or a run link). The run service also excludes
  issues with a deferred wake; no public RPC lists wakes, so this view cannot.

While a service is down its health says so and the figures are left out (they need
every service); the command then exits 6.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import typer

from paperclip_cli.deferred import (
    agents_pb2,
    errors,
    gateway_client,
    health_pb2,
    health_pb2_grpc,
    issues_pb2,
    routes,
    run_messages_pb2,
    runs_pb2,
)
from paperclip_cli.exit_codes import ExitCode
from paperclip_cli.invocation import call, output
from paperclip_cli.paging import collect

if TYPE_CHECKING:
    from paperclip_client import PaperclipClient

#: What the view leaves out for want of a public RPC.
NOT_SHOWN = ("deferred wakes (no public RPC lists wakeup requests)",)


@dataclass
class CompanyFigures:
    """One company's queue, running runs and stranded issues."""

    company_id: str
    issue_prefix: str
    queued: int = 0
    running_by_agent: dict[str, int] = field(default_factory=dict)
    agent_names: dict[str, str] = field(default_factory=dict)
    stranded: list[dict[str, str]] = field(default_factory=list)


async def _health(client: PaperclipClient) -> dict[str, str]:

    stub: Any = health_pb2_grpc.HealthStub(client.channel)
    names = [
        "",
        gateway_client.GATEWAY_HEALTH_SERVICE,
        "paperclip.gateway.v1.AuthService",
        *routes.PUBLIC_SERVICES,
    ]
    replies = await asyncio.gather(
        *(stub.Check(health_pb2.HealthCheckRequest(service=n), timeout=5) for n in names)
    )
    return {
        name: health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        for name, reply in zip(names, replies, strict=True)
    }


async def _all_runs(
    client: PaperclipClient, company_id: str, status: Any, **filters: Any
) -> list[run_messages_pb2.Run]:

    async def page(size: int, token: str) -> tuple[list[run_messages_pb2.Run], str]:
        reply = await client.runs.ListRuns(
            runs_pb2.ListRunsRequest(
                company_id=company_id,
                statuses=[status],
                page_size=size,
                page_token=token,
                **filters,
            )
        )
        return list(reply.runs), reply.next_page_token

    return await collect(page, 0)


async def _company_figures(client: PaperclipClient, company: issues_pb2.Company) -> CompanyFigures:
    figures = CompanyFigures(company.id, company.issue_prefix)
    queued, running, agents, open_issues = await asyncio.gather(
        _all_runs(client, company.id, run_messages_pb2.RUN_STATUS_QUEUED),
        _all_runs(client, company.id, run_messages_pb2.RUN_STATUS_RUNNING),
        _all_agents(client, company.id),
        _open_issues(client, company.id),
    )
    figures.queued = len(queued)
    figures.running_by_agent = dict(Counter(r.agent_id for r in running))
    figures.agent_names = {a.id: a.name for a in agents}
    active_agents = {a.id for a in agents if a.status == agents_pb2.AGENT_STATUS_ACTIVE}
    busy_issues = {r.issue_id for r in (*queued, *running) if r.issue_id}
    candidates = [
        i
        for i in open_issues
        if i.assignee_agent_id in active_agents
        and not i.assignee_user_id
        and i.id not in busy_issues
    ]
    latest = await asyncio.gather(*(_latest_run(client, company.id, i) for i in candidates))
    for issue, run in zip(candidates, latest, strict=True):
        if _stranded(issue, run):
            figures.stranded.append(_stranded_row(issue, run))
    return figures


async def _all_agents(client: PaperclipClient, company_id: str) -> list[agents_pb2.Agent]:
    async def page(size: int, token: str) -> tuple[list[agents_pb2.Agent], str]:
        reply = await client.runs.ListAgents(
            agents_pb2.ListAgentsRequest(company_id=company_id, page_size=size, page_token=token)
        )
        return list(reply.agents), reply.next_page_token

    return await collect(page, 0)


async def _open_issues(client: PaperclipClient, company_id: str) -> list[issues_pb2.Issue]:
    """The company's ``todo`` and ``in_progress`` issues."""

    async def page(size: int, token: str) -> tuple[list[issues_pb2.Issue], str]:
        reply = await client.issues.ListIssues(
            issues_pb2.ListIssuesRequest(
                company_id=company_id,
                statuses=[issues_pb2.ISSUE_STATUS_TODO, issues_pb2.ISSUE_STATUS_IN_PROGRESS],
                page_size=size,
                page_token=token,
            )
        )
        return list(reply.issues), reply.next_page_token

    return await collect(page, 0)


async def _latest_run(
    client: PaperclipClient, company_id: str, issue: issues_pb2.Issue
) -> run_messages_pb2.Run | None:
    """The latest run of the issue's assignee on the issue, if any."""
    reply = await client.runs.ListRuns(
        runs_pb2.ListRunsRequest(
            company_id=company_id,
            agent_id=issue.assignee_agent_id,
            issue_id=issue.id,
            page_size=1,
        )
    )
    return reply.runs[0] if reply.runs else None


def _stranded_row(issue: issues_pb2.Issue, run: run_messages_pb2.Run | None) -> dict[str, str]:
    return {
        "issue_id": issue.id,
        "identifier": issue.identifier,
        "status": issues_pb2.IssueStatus.Name(issue.status),
        "agent_id": issue.assignee_agent_id,
        "latest_run_id": run.id if run else "",
        "latest_run_status": run_messages_pb2.RunStatus.Name(run.status) if run else "",
    }


def _stranded(issue: issues_pb2.Issue, latest: run_messages_pb2.Run | None) -> bool:
    """The run service's reconcile rule: whether nothing will move ``issue`` on."""

    if issue.status == issues_pb2.ISSUE_STATUS_TODO:
        return latest is not None and latest.status != run_messages_pb2.RUN_STATUS_SUCCEEDED
    linked = bool(issue.checkout_run_id or issue.execution_run_id)
    return latest is not None or linked


def status(ctx: typer.Context) -> None:
    """Health of every service, queue depth, running runs per agent, stranded issues."""

    async def work(client: PaperclipClient) -> ExitCode:
        health = await _health(client)

        async def page(size: int, token: str) -> tuple[list[issues_pb2.Company], str]:
            reply = await client.issues.ListCompanies(
                issues_pb2.ListCompaniesRequest(page_size=size, page_token=token)
            )
            return list(reply.companies), reply.next_page_token

        healthy = all(value == "SERVING" for value in health.values())
        try:
            companies = await collect(page, 0)
            figures = await asyncio.gather(*(_company_figures(client, c) for c in companies))
        except errors.PaperclipError as error:
            if healthy:
                raise
            # A service is down: its health says so; the figures need all of them.
            _print_health_only(ctx, health, f"{error.reason}: {error.message}")
            return ExitCode.UNAVAILABLE
        _print(ctx, health, list(figures))
        return ExitCode.OK if healthy else ExitCode.UNAVAILABLE

    call(ctx, work)


def _health_table(ctx: typer.Context, health: dict[str, str]) -> None:
    output(ctx).table(
        ["SERVICE", "HEALTH"],
        [[name or "(suite)", value.lower()] for name, value in health.items()],
        title="health",
    )


def _print_health_only(ctx: typer.Context, health: dict[str, str], failure: str) -> None:
    out = output(ctx)
    if out.as_json:
        out.data({"health": health, "figures_error": failure})
        return
    _health_table(ctx, health)
    out.note(f"no figures while a service is down ({failure})")


def _print(ctx: typer.Context, health: dict[str, str], figures: list[CompanyFigures]) -> None:
    out = output(ctx)
    if out.as_json:
        out.data(
            {
                "health": health,
                "queue_depth": sum(f.queued for f in figures),
                "companies": [asdict(f) for f in figures],
                "not_shown": list(NOT_SHOWN),
            }
        )
        return
    _health_table(ctx, health)
    out.table(
        ["COMPANY", "QUEUED", "RUNNING", "STRANDED"],
        [
            [
                f.issue_prefix,
                str(f.queued),
                str(sum(f.running_by_agent.values())),
                str(len(f.stranded)),
            ]
            for f in figures
        ],
        title=f"queue depth: {sum(f.queued for f in figures)}",
    )
    running = [
        [f.issue_prefix, f.agent_names.get(agent, "?"), agent, str(count)]
        for f in figures
        for agent, count in sorted(f.running_by_agent.items())
    ]
    if running:
        out.table(["COMPANY", "AGENT", "AGENT ID", "RUNNING"], running, title="running runs")
    stranded = [
        [
            s["identifier"],
            s["status"].removeprefix("ISSUE_STATUS_").lower(),
            f.agent_names.get(s["agent_id"], "?"),
            s["latest_run_status"].removeprefix("RUN_STATUS_").lower() or "-",
            s["issue_id"],
        ]
        for f in figures
        for s in f.stranded
    ]
    if stranded:
        out.table(
            ["ISSUE", "STATUS", "AGENT", "LATEST RUN", "ID"], stranded, title="stranded issues"
        )
    out.note("not shown: " + "; ".join(NOT_SHOWN))
