"""``paperclip workspaces``: list, show, readiness, archive, and ``services``
(list, start, stop, restart)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from paperclip_cli.choices import WorkspaceStatus, proto_value
from paperclip_cli.deferred import workspace_messages_pb2, workspaces_pb2
from paperclip_cli.invocation import call, output
from paperclip_cli.lookups import company_id, issue_id
from paperclip_cli.output import Column, to_dict
from paperclip_cli.paging import collect

if TYPE_CHECKING:
    from paperclip_client import PaperclipClient

app = typer.Typer(help="Execution workspaces and their runtime services.", no_args_is_help=True)
services_app = typer.Typer(help="A workspace's long-running services.", no_args_is_help=True)
app.add_typer(services_app, name="services")

COLUMNS: list[Column] = [
    ("ID", "id"),
    ("NAME", "name"),
    ("STATUS", "status"),
    ("STRATEGY", "strategy_type"),
    ("ISSUE", "source_issue_id"),
    ("CWD", "cwd"),
]
SERVICE_COLUMNS: list[Column] = [
    ("ID", "id"),
    ("NAME", "service_name"),
    ("INDEX", "service_index"),
    ("STATUS", "status"),
    ("HEALTH", "health_status"),
    ("PORT", "port"),
    ("URL", "url"),
    ("PID", "pid"),
]

WorkspaceArg = Annotated[str, typer.Argument(help="Workspace id.")]


@app.command("list")
def list_workspaces(
    ctx: typer.Context,
    company: Annotated[
        str,
        typer.Option(
            "--company", "-c", envvar="PAPERCLIP_COMPANY", help="Company id or issue prefix."
        ),
    ],
    issue: Annotated[str, typer.Option(help="Only this issue's (id or identifier).")] = "",
    status: Annotated[
        list[WorkspaceStatus] | None, typer.Option("--status", "-s", help="Only these (repeat).")
    ] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many (0: all).")] = 50,
) -> None:
    """A company's execution workspaces, most recently used first."""

    async def work(client: PaperclipClient) -> None:
        company_uuid = await company_id(client, company)
        issue_uuid = await issue_id(client, issue) if issue else ""

        async def page(
            size: int, token: str
        ) -> tuple[list[workspace_messages_pb2.ExecutionWorkspace], str]:
            reply = await client.workspaces.ListExecutionWorkspaces(
                workspaces_pb2.ListExecutionWorkspacesRequest(
                    company_id=company_uuid,
                    issue_id=issue_uuid,
                    statuses=[
                        proto_value(workspace_messages_pb2.WorkspaceStatus, s) for s in status or []
                    ],
                    page_size=size,
                    page_token=token,
                )
            )
            return list(reply.workspaces), reply.next_page_token

        output(ctx).listing(await collect(page, limit), COLUMNS, empty="no workspaces")

    call(ctx, work)


@app.command("show")
def show(ctx: typer.Context, workspace: WorkspaceArg) -> None:
    """One workspace and its runtime services."""

    async def work(client: PaperclipClient) -> None:
        found = await client.workspaces.GetExecutionWorkspace(
            workspaces_pb2.GetExecutionWorkspaceRequest(id=workspace)
        )
        out = output(ctx)
        out.resource(found)
        if not out.as_json and found.runtime_services:
            out.listing(list(found.runtime_services), SERVICE_COLUMNS, empty="")

    call(ctx, work)


@app.command("readiness")
def readiness(ctx: typer.Context, workspace: WorkspaceArg) -> None:
    """Whether the workspace may be archived, and what archiving would do."""

    async def work(client: PaperclipClient) -> None:
        found = await client.workspaces.GetCloseReadiness(
            workspaces_pb2.GetCloseReadinessRequest(workspace_id=workspace)
        )
        out = output(ctx)
        if out.as_json:
            out.data(to_dict(found))
            return
        state = workspaces_pb2.CloseReadinessState.Name(found.state)
        out.fields(
            [
                ("state", state.removeprefix("CLOSE_READINESS_STATE_").lower()),
                ("blocking", "; ".join(found.blocking_reasons)),
                ("warnings", "; ".join(found.warnings)),
                ("planned", ", ".join(found.planned_actions)),
                ("linked issues", ", ".join(i.identifier for i in found.linked_issues)),
            ]
        )

    call(ctx, work)


@app.command("archive")
def archive(ctx: typer.Context, workspace: WorkspaceArg) -> None:
    """Close a workspace: stop its services, clean up, remove its worktree."""

    async def work(client: PaperclipClient) -> None:
        reply = await client.workspaces.ArchiveExecutionWorkspace(
            workspaces_pb2.ArchiveExecutionWorkspaceRequest(workspace_id=workspace)
        )
        out = output(ctx)
        if out.as_json:
            out.data(to_dict(reply))
            return
        out.resource(reply.workspace)
        for warning in reply.warnings:
            out.note(f"warning: {warning}")

    call(ctx, work)


@services_app.command("list")
def list_services(ctx: typer.Context, workspace: WorkspaceArg) -> None:
    """A workspace's runtime services."""

    async def work(client: PaperclipClient) -> None:
        reply = await client.workspaces.ListRuntimeServices(
            workspaces_pb2.ListRuntimeServicesRequest(workspace_id=workspace)
        )
        output(ctx).listing(list(reply.services), SERVICE_COLUMNS, empty="no services")

    call(ctx, work)


ServiceIdOpt = Annotated[str, typer.Option("--service", help="One service by its record id.")]
IndexOpt = Annotated[int | None, typer.Option(help="One service by its index in the config.")]


def _control(
    ctx: typer.Context, workspace: str, action: str, service: str, index: int | None
) -> None:

    async def work(client: PaperclipClient) -> None:
        request = workspaces_pb2.ControlRuntimeServicesRequest(
            workspace_id=workspace,
            action=workspaces_pb2.RuntimeAction.Value(action),
            runtime_service_id=service,
        )
        if index is not None:
            request.service_index = index
        reply = await client.workspaces.ControlRuntimeServices(request)
        out = output(ctx)
        if out.as_json:
            out.data(to_dict(reply))
            return
        services: list[workspace_messages_pb2.RuntimeService] = list(
            reply.workspace.runtime_services
        )
        out.listing(services, SERVICE_COLUMNS, empty="no services")
        out.note(f"operation {reply.operation.id}")

    call(ctx, work)


@services_app.command("start")
def start(
    ctx: typer.Context, workspace: WorkspaceArg, service: ServiceIdOpt = "", index: IndexOpt = None
) -> None:
    """Start the workspace's services (all, or one); waits until they are ready."""
    _control(ctx, workspace, "RUNTIME_ACTION_START", service, index)


@services_app.command("stop")
def stop(
    ctx: typer.Context, workspace: WorkspaceArg, service: ServiceIdOpt = "", index: IndexOpt = None
) -> None:
    """Stop the workspace's services (all, or one): their whole process trees."""
    _control(ctx, workspace, "RUNTIME_ACTION_STOP", service, index)


@services_app.command("restart")
def restart(
    ctx: typer.Context, workspace: WorkspaceArg, service: ServiceIdOpt = "", index: IndexOpt = None
) -> None:
    """Restart the workspace's services (all, or one)."""
    _control(ctx, workspace, "RUNTIME_ACTION_RESTART", service, index)
