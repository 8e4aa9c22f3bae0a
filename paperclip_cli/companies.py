"""``paperclip companies``: list, show, create."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from paperclip_cli.deferred import issues_pb2
from paperclip_cli.invocation import call, output
from paperclip_cli.lookups import company_id
from paperclip_cli.paging import collect

if TYPE_CHECKING:
    from paperclip_client import PaperclipClient

app = typer.Typer(help="Companies (tenants).", no_args_is_help=True)

COLUMNS = [("ID", "id"), ("PREFIX", "issue_prefix"), ("NAME", "name"), ("STATUS", "status")]

CompanyArg = Annotated[str, typer.Argument(help="Company id or issue prefix.")]
Limit = Annotated[int, typer.Option(help="Show at most this many (0: all).")]


@app.command("list")
def list_companies(ctx: typer.Context, limit: Limit = 100) -> None:
    """The companies the token may see."""

    async def work(client: PaperclipClient) -> None:
        async def page(size: int, token: str) -> tuple[list[issues_pb2.Company], str]:
            reply = await client.issues.ListCompanies(
                issues_pb2.ListCompaniesRequest(page_size=size, page_token=token)
            )
            return list(reply.companies), reply.next_page_token

        output(ctx).listing(await collect(page, limit), COLUMNS, empty="no companies")

    call(ctx, work)


@app.command("show")
def show(ctx: typer.Context, company: CompanyArg) -> None:
    """One company."""

    async def work(client: PaperclipClient) -> None:
        found = await client.issues.GetCompany(
            issues_pb2.GetCompanyRequest(company_id=await company_id(client, company))
        )
        output(ctx).resource(found)

    call(ctx, work)


@app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The company's name.")],
    prefix: Annotated[
        str, typer.Option(help="Issue prefix, 2-10 upper-case letters (default: from the name).")
    ] = "",
) -> None:
    """Create a company."""

    async def work(client: PaperclipClient) -> None:
        made: issues_pb2.Company = await client.issues.CreateCompany(
            issues_pb2.CreateCompanyRequest(name=name, issue_prefix=prefix)
        )
        output(ctx).resource(made)

    call(ctx, work)
