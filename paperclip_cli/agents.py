"""``paperclip agents``: list, show, create (from a command), pause, resume, terminate,
wake."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from paperclip_cli.choices import WakeSource, proto_value
from paperclip_cli.deferred import agents_pb2, field_mask_pb2, run_messages_pb2, runs_pb2
from paperclip_cli.exit_codes import ExitCode
from paperclip_cli.invocation import call, output
from paperclip_cli.lookups import company_id, issue_id
from paperclip_cli.output import Column, to_dict
from paperclip_cli.paging import collect
from paperclip_cli.run_watch import watch as watch_run

if TYPE_CHECKING:
    from paperclip_client import PaperclipClient

app = typer.Typer(help="Agents: the programs runs execute.", no_args_is_help=True)

COLUMNS: list[Column] = [
    ("ID", "id"),
    ("NAME", "name"),
    ("STATUS", "status"),
    ("ROLE", "role"),
    ("COMMAND", lambda a: " ".join(a.adapter_config.command)),
]

AgentArg = Annotated[str, typer.Argument(help="Agent id.")]
CompanyOpt = Annotated[
    str,
    typer.Option("--company", "-c", envvar="PAPERCLIP_COMPANY", help="Company id or issue prefix."),
]


@app.command("list")
def list_agents(
    ctx: typer.Context,
    company: CompanyOpt,
    limit: Annotated[int, typer.Option(help="Show at most this many (0: all).")] = 100,
) -> None:
    """A company's agents."""

    async def work(client: PaperclipClient) -> None:
        company_uuid = await company_id(client, company)

        async def page(size: int, token: str) -> tuple[list[agents_pb2.Agent], str]:
            reply = await client.runs.ListAgents(
                agents_pb2.ListAgentsRequest(
                    company_id=company_uuid, page_size=size, page_token=token
                )
            )
            return list(reply.agents), reply.next_page_token

        output(ctx).listing(await collect(page, limit), COLUMNS, empty="no agents")

    call(ctx, work)


@app.command("show")
def show(ctx: typer.Context, agent: AgentArg) -> None:
    """One agent, with its effective runtime settings."""

    async def work(client: PaperclipClient) -> None:
        found = await client.runs.GetAgent(agents_pb2.GetAgentRequest(agent_id=agent))
        out = output(ctx)
        out.resource(found)
        if not out.as_json:
            out.resource(found.runtime_config, title="runtime")

    call(ctx, work)


def _env_pairs(values: list[str]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--env")
        pairs[key] = value
    return pairs


@app.command("create")
def create(
    ctx: typer.Context,
    *,
    company: CompanyOpt,
    name: Annotated[str, typer.Argument(help="Unique in the company; @name mentions it.")],
    command: Annotated[list[str], typer.Argument(help="The program and its arguments (after --).")],
    role: Annotated[str, typer.Option()] = "",
    cwd: Annotated[str, typer.Option(help="Working directory of its runs.")] = "",
    env: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE added to its environment (repeat).")
    ] = None,
    max_concurrent_runs: Annotated[int | None, typer.Option(help="[default: 5]")] = None,
    timeout: Annotated[int | None, typer.Option(help="Wall-clock seconds per run.")] = None,
    idle_timeout: Annotated[
        int | None, typer.Option(help="Seconds without output or activity (0: none).")
    ] = None,
    grace: Annotated[int | None, typer.Option(help="Seconds from SIGTERM to SIGKILL.")] = None,
    heartbeat_interval: Annotated[
        int | None, typer.Option(help="Seconds between timer wakes (0: none).")
    ] = None,
    wake_on_demand: Annotated[
        bool, typer.Option(help="Accept on-demand and assignment wakes.")
    ] = True,
) -> None:
    """Create an agent that runs COMMAND: paperclip agents create -c PAP NAME -- CMD ARGS..."""

    runtime = agents_pb2.RuntimeConfig(wake_on_demand=wake_on_demand)
    for field, value in (
        ("max_concurrent_runs", max_concurrent_runs),
        ("timeout_seconds", timeout),
        ("idle_timeout_seconds", idle_timeout),
        ("grace_seconds", grace),
        ("heartbeat_interval_seconds", heartbeat_interval),
    ):
        if value is not None:
            setattr(runtime, field, value)
    adapter = agents_pb2.AdapterConfig(command=command, cwd=cwd, env=_env_pairs(env or []))

    async def work(client: PaperclipClient) -> None:
        made = await client.runs.CreateAgent(
            agents_pb2.CreateAgentRequest(
                company_id=await company_id(client, company),
                name=name,
                role=role,
                adapter_type="process",
                adapter_config=adapter,
                runtime_config=runtime,
            )
        )
        output(ctx).resource(made)

    call(ctx, work)


def _set_status(ctx: typer.Context, agent: str, status_name: str) -> None:

    async def work(client: PaperclipClient) -> None:
        updated = await client.runs.UpdateAgent(
            agents_pb2.UpdateAgentRequest(
                agent=agents_pb2.Agent(id=agent, status=agents_pb2.AgentStatus.Value(status_name)),
                update_mask=field_mask_pb2.FieldMask(paths=["status"]),
            )
        )
        output(ctx).resource(updated)

    call(ctx, work)


@app.command("pause")
def pause(ctx: typer.Context, agent: AgentArg) -> None:
    """Pause an agent: its wakes are skipped, nothing new starts."""
    _set_status(ctx, agent, "AGENT_STATUS_PAUSED")


@app.command("resume")
def resume(ctx: typer.Context, agent: AgentArg) -> None:
    """Resume a paused agent."""
    _set_status(ctx, agent, "AGENT_STATUS_ACTIVE")


@app.command("terminate")
def terminate(ctx: typer.Context, agent: AgentArg) -> None:
    """Terminate an agent for good: it never runs again."""
    _set_status(ctx, agent, "AGENT_STATUS_TERMINATED")


@app.command("wake")
def wake(
    ctx: typer.Context,
    *,
    agent: AgentArg,
    reason: Annotated[str, typer.Option(help="Why; the run sees PAPERCLIP_WAKE_REASON.")] = "",
    issue: Annotated[str, typer.Option(help="The issue to work on (id or identifier).")] = "",
    source: Annotated[WakeSource, typer.Option()] = WakeSource.on_demand,
    watch: Annotated[
        bool, typer.Option(help="Then follow the run's output until it ends.")
    ] = False,
) -> None:
    """Wake an agent: queue a run, or merge into / wait for one (see the wakeup status)."""

    async def work(client: PaperclipClient) -> ExitCode | None:
        reply = await client.runs.WakeAgent(
            runs_pb2.WakeAgentRequest(
                agent_id=agent,
                source=proto_value(run_messages_pb2.WakeSource, source),
                reason=reason,
                issue_id=await issue_id(client, issue) if issue else "",
            )
        )
        out = output(ctx)
        if out.as_json and not watch:
            out.data(to_dict(reply))
        elif not out.as_json:
            wakeup = reply.wakeup_request
            outcome = run_messages_pb2.WakeupStatus.Name(wakeup.status)
            line = f"wakeup {wakeup.id}: {outcome.removeprefix('WAKEUP_STATUS_').lower()}"
            if wakeup.skip_reason:
                line += f" ({wakeup.skip_reason})"
            if reply.run.id or wakeup.run_id:
                line += f"; run {reply.run.id or wakeup.run_id}"
            (out.note if watch else out.line)(line)
        if not watch:
            return None
        # A coalesced wake names the run it merged into.
        run_id = reply.run.id or reply.wakeup_request.run_id
        if not run_id:
            out.note("nothing to watch: the wake started no run")
            return ExitCode.CONFLICT
        return await watch_run(client, run_id, out)

    call(ctx, work)
