"""``paperclip runs``: list, show, cancel, watch (live output), logs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from paperclip_cli.choices import RunStatus, proto_value
from paperclip_cli.deferred import run_messages_pb2, runs_pb2
from paperclip_cli.exit_codes import ExitCode
from paperclip_cli.invocation import call, output
from paperclip_cli.lookups import company_id, issue_id
from paperclip_cli.output import Column
from paperclip_cli.paging import collect
from paperclip_cli.run_watch import print_event
from paperclip_cli.run_watch import watch as watch_run

if TYPE_CHECKING:
    from paperclip_client import PaperclipClient

app = typer.Typer(help="Runs: one supervised execution of an agent each.", no_args_is_help=True)

COLUMNS: list[Column] = [
    ("ID", "id"),
    ("STATUS", "status"),
    ("AGENT", "agent_id"),
    ("ISSUE", "issue_id"),
    ("SOURCE", "invocation_source"),
    ("CREATED", "created_at"),
    ("ERROR", "error_code"),
]

RunArg = Annotated[str, typer.Argument(help="Run id.")]


@app.command("list")
def list_runs(
    ctx: typer.Context,
    *,
    company: Annotated[
        str,
        typer.Option(
            "--company", "-c", envvar="PAPERCLIP_COMPANY", help="Company id or issue prefix."
        ),
    ],
    agent: Annotated[str, typer.Option(help="Only this agent's runs.")] = "",
    issue: Annotated[str, typer.Option(help="Only runs on this issue (id or identifier).")] = "",
    status: Annotated[
        list[RunStatus] | None, typer.Option("--status", "-s", help="Only these (repeat).")
    ] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many (0: all).")] = 50,
) -> None:
    """A company's runs, newest first."""

    async def work(client: PaperclipClient) -> None:
        company_uuid = await company_id(client, company)
        issue_uuid = await issue_id(client, issue) if issue else ""

        async def page(size: int, token: str) -> tuple[list[run_messages_pb2.Run], str]:
            reply = await client.runs.ListRuns(
                runs_pb2.ListRunsRequest(
                    company_id=company_uuid,
                    agent_id=agent,
                    issue_id=issue_uuid,
                    statuses=[proto_value(run_messages_pb2.RunStatus, s) for s in status or []],
                    page_size=size,
                    page_token=token,
                )
            )
            return list(reply.runs), reply.next_page_token

        output(ctx).listing(await collect(page, limit), COLUMNS, empty="no runs")

    call(ctx, work)


@app.command("show")
def show(ctx: typer.Context, run: RunArg) -> None:
    """One run: status, process, exit code, error."""

    async def work(client: PaperclipClient) -> None:
        output(ctx).resource(await client.runs.GetRun(runs_pb2.GetRunRequest(run_id=run)))

    call(ctx, work)


@app.command("cancel")
def cancel(
    ctx: typer.Context,
    run: RunArg,
    reason: Annotated[str, typer.Option(help="Recorded with the cancellation.")] = "",
) -> None:
    """Cancel a run: its process tree is stopped (SIGTERM, grace, SIGKILL)."""

    async def work(client: PaperclipClient) -> None:
        done = await client.runs.CancelRun(runs_pb2.CancelRunRequest(run_id=run, reason=reason))
        output(ctx).resource(done)

    call(ctx, work)


@app.command("watch")
def watch(
    ctx: typer.Context,
    run: RunArg,
    after_seq: Annotated[int, typer.Option(help="Start after this event number.")] = 0,
) -> None:
    """Follow a run's output live until it ends; exit 0 if it succeeded, 7 if not."""

    async def work(client: PaperclipClient) -> ExitCode:
        return await watch_run(client, run, output(ctx), after_seq)

    call(ctx, work)


@app.command("logs")
def logs(
    ctx: typer.Context,
    run: RunArg,
    after_seq: Annotated[int, typer.Option(help="Start after this event number.")] = 0,
) -> None:
    """A run's recorded events so far (its output, in order), then return."""

    async def work(client: PaperclipClient) -> None:
        out = output(ctx)

        async def page(size: int, token: str) -> tuple[list[run_messages_pb2.RunEvent], str]:
            reply = await client.runs.ListRunEvents(
                runs_pb2.ListRunEventsRequest(
                    run_id=run, after_seq=after_seq, page_size=size, page_token=token
                )
            )
            return list(reply.events), reply.next_page_token

        for event in await collect(page, 0):
            print_event(event, out)

    call(ctx, work)
