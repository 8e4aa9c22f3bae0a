"""``paperclip keys``: board API keys (create, revoke), and ``paperclip whoami``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from paperclip_cli.choices import Role, proto_value
from paperclip_cli.deferred import auth_pb2
from paperclip_cli.invocation import call, output
from paperclip_cli.output import to_dict

if TYPE_CHECKING:
    from paperclip_client import PaperclipClient

app = typer.Typer(help="Board API keys (instance admins).", no_args_is_help=True)


def _memberships(values: list[str]) -> list[tuple[str, Role]]:
    found: list[tuple[str, Role]] = []
    for item in values:
        company, _, role = item.rpartition(":")
        try:
            found.append((company, Role(role)))
        except ValueError:
            company = ""
        if not company:
            raise typer.BadParameter(
                f"expected COMPANY_ID:admin|member|viewer, got {item!r}", param_hint="--member"
            )
    return found


@app.command("create")
def create(
    ctx: typer.Context,
    user: Annotated[str, typer.Argument(help="The user the key acts as (made on first use).")],
    name: Annotated[str, typer.Option(help="A label, such as the tool that uses it.")] = "",
    member: Annotated[
        list[str] | None,
        typer.Option(help="COMPANY_ID:admin|member|viewer (repeat)."),
    ] = None,
    admin: Annotated[
        bool, typer.Option("--admin", help="Make the user an instance admin.")
    ] = False,
) -> None:
    """Create a board key; its token is printed once (only its hash is stored)."""

    memberships = [
        auth_pb2.CompanyMembership(company_id=c, role=proto_value(auth_pb2.Role, r))
        for c, r in _memberships(member or [])
    ]

    async def work(client: PaperclipClient) -> None:
        reply = await client.auth.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(
                user_id=user, name=name, is_instance_admin=admin, memberships=memberships
            )
        )
        out = output(ctx)
        if out.as_json:
            out.data(to_dict(reply))
            return
        out.resource(reply.api_key)
        out.line(f"token: {reply.token}")
        out.note("store the token now: it is not shown again")

    call(ctx, work)


@app.command("revoke")
def revoke(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="The key's id (not its token).")],
) -> None:
    """Revoke a board key: refused from the next call on."""

    async def work(client: PaperclipClient) -> None:
        output(ctx).resource(
            await client.auth.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(api_key_id=key))
        )

    call(ctx, work)


def whoami(ctx: typer.Context) -> None:
    """Who the gateway takes the token for."""

    async def work(client: PaperclipClient) -> None:
        output(ctx).resource(await client.auth.WhoAmI(auth_pb2.WhoAmIRequest()))

    call(ctx, work)
