"""Names operators type instead of UUIDs: a company by its issue prefix, an issue by its
identifier (``PAP-12``)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from paperclip_cli.connection import CliFailure
from paperclip_cli.deferred import issues_pb2
from paperclip_cli.exit_codes import ExitCode
from paperclip_cli.paging import collect

if TYPE_CHECKING:
    from paperclip_client import PaperclipClient


def is_uuid(value: str) -> bool:
    """Whether ``value`` is a UUID (the API's ids)."""
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


async def company_id(client: PaperclipClient, company: str) -> str:
    """The id of ``company``: a UUID as given, or the company with that issue prefix."""
    if is_uuid(company):
        return company

    async def page(size: int, token: str) -> tuple[list[issues_pb2.Company], str]:
        reply = await client.issues.ListCompanies(
            issues_pb2.ListCompaniesRequest(page_size=size, page_token=token)
        )
        return list(reply.companies), reply.next_page_token

    wanted = company.strip().upper()
    for found in await collect(page, 0):
        if found.issue_prefix.upper() == wanted:
            return found.id
    raise CliFailure(
        f"no company with the id or issue prefix {company!r}",
        hint="`paperclip companies list` shows them",
        exit_code=ExitCode.NOT_FOUND,
    )


async def issue_id(client: PaperclipClient, issue: str) -> str:
    """The id of ``issue``: a UUID as given, or the issue with that identifier."""
    if is_uuid(issue):
        return issue

    found = await client.issues.GetIssue(issues_pb2.GetIssueRequest(issue=issue))
    return found.id


__all__ = ["company_id", "is_uuid", "issue_id"]
