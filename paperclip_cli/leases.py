"""``paperclip leases``: acquire, renew, release an environment lease.

There is no list: no public RPC lists leases (a workspace's leases are released with it
by ``paperclip workspaces archive``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from paperclip_cli.deferred import workspaces_pb2
from paperclip_cli.invocation import call, output
from paperclip_cli.lookups import company_id, issue_id

if TYPE_CHECKING:
    from paperclip_client import PaperclipClient

app = typer.Typer(
    help="Environment leases: one holder per environment and workspace.", no_args_is_help=True
)

LeaseArg = Annotated[str, typer.Argument(help="Lease id.")]


@app.command("acquire")
def acquire(
    ctx: typer.Context,
    *,
    company: Annotated[
        str,
        typer.Option(
            "--company", "-c", envvar="PAPERCLIP_COMPANY", help="Company id or issue prefix."
        ),
    ],
    environment: Annotated[str, typer.Option(help="The environment to claim.")],
    workspace: Annotated[str, typer.Option(help="The workspace id it is claimed for.")],
    run: Annotated[str, typer.Option(help="The run it belongs to (released when it ends).")] = "",
    issue: Annotated[str, typer.Option(help="Issue id or identifier.")] = "",
    ttl: Annotated[int, typer.Option(help="Seconds until it expires unless renewed.")] = 300,
    policy: Annotated[str, typer.Option(help="ephemeral or reuse_by_environment.")] = "",
) -> None:
    """Claim an environment for a workspace (the holder gets its lease back renewed)."""

    async def work(client: PaperclipClient) -> None:
        lease = await client.workspaces.AcquireEnvironmentLease(
            workspaces_pb2.AcquireEnvironmentLeaseRequest(
                company_id=await company_id(client, company),
                environment_id=environment,
                workspace_id=workspace,
                run_id=run,
                issue_id=await issue_id(client, issue) if issue else "",
                ttl_seconds=ttl,
                lease_policy=policy,
            )
        )
        output(ctx).resource(lease)

    call(ctx, work)


@app.command("renew")
def renew(
    ctx: typer.Context,
    lease: LeaseArg,
    ttl: Annotated[int, typer.Option(help="New TTL (default: the one it was acquired with).")] = 0,
) -> None:
    """Push a lease's expiry out."""

    async def work(client: PaperclipClient) -> None:
        renewed = await client.workspaces.RenewEnvironmentLease(
            workspaces_pb2.RenewEnvironmentLeaseRequest(lease_id=lease, ttl_seconds=ttl)
        )
        output(ctx).resource(renewed)

    call(ctx, work)


@app.command("release")
def release(
    ctx: typer.Context,
    lease: LeaseArg,
    failure: Annotated[str, typer.Option(help="End it failed, with this reason.")] = "",
) -> None:
    """Release a lease (a lease no longer active is shown as it is)."""

    async def work(client: PaperclipClient) -> None:
        released = await client.workspaces.ReleaseEnvironmentLease(
            workspaces_pb2.ReleaseEnvironmentLeaseRequest(lease_id=lease, failure_reason=failure)
        )
        output(ctx).resource(released)

    call(ctx, work)
