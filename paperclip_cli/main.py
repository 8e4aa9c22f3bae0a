"""``paperclip``: the operator's command line for a Paperclip Core suite.

Every command talks to the gateway only, with the typed client. The global options come
before the command (``paperclip --json issues list --company PAP``).
"""

from __future__ import annotations

from typing import Annotated

import typer

from paperclip_cli import agents, companies, issues, keys, leases, runs, status, workspaces
from paperclip_cli.connection import resolve_connection
from paperclip_cli.invocation import Invocation
from paperclip_cli.output import Output

app = typer.Typer(
    name="paperclip",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(companies.app, name="companies")
app.add_typer(issues.app, name="issues")
app.add_typer(agents.app, name="agents")
app.add_typer(runs.app, name="runs")
app.add_typer(workspaces.app, name="workspaces")
app.add_typer(leases.app, name="leases")
app.add_typer(keys.app, name="keys")
app.command("status")(status.status)
app.command("whoami")(keys.whoami)


@app.callback()
def root(
    ctx: typer.Context,
    gateway: Annotated[
        str | None,
        typer.Option(
            envvar="PAPERCLIP_GATEWAY_ADDR",
            help="The gateway address (host:port). [default: 127.0.0.1:50051]",
            show_default=False,
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="PAPERCLIP_TOKEN",
            help="Bearer token. [default: the board-token file in PAPERCLIP_HOME]",
            show_default=False,
        ),
    ] = None,
    home: Annotated[
        str | None,
        typer.Option(
            envvar="PAPERCLIP_HOME",
            help="Where the suite keeps its board-token. [default: ./.paperclip]",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON for scripts instead of tables.")
    ] = False,
) -> None:
    """Operate a Paperclip Core suite through its gateway.

    Exit codes: 0 ok, 1 other failure, 2 usage or invalid argument, 3 not found,
    4 conflict or failed precondition, 5 unauthenticated or permission denied,
    6 unavailable, 7 watched run did not succeed, 130 interrupted.
    """
    ctx.obj = Invocation(resolve_connection(gateway, token, home), Output(as_json=as_json))


def main() -> None:
    """The ``paperclip`` console script."""
    app()


__all__ = ["app", "main"]
