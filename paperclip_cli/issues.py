"""``paperclip issues``: list, show, create, assign, status, comment, checkout, release,
force-release."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Annotated, Any

import typer

from paperclip_cli.choices import IssuePriority, IssueStatus, proto_value
from paperclip_cli.deferred import field_mask_pb2, issues_pb2
from paperclip_cli.invocation import call, output
from paperclip_cli.lookups import company_id, issue_id
from paperclip_cli.output import Column, format_field, to_dict
from paperclip_cli.paging import collect

if TYPE_CHECKING:
    from paperclip_client import PaperclipClient

app = typer.Typer(help="Issues: filing, assignment, checkout and comments.", no_args_is_help=True)

COLUMNS: list[Column] = [
    ("KEY", "identifier"),
    ("STATUS", "status"),
    ("PRIORITY", "priority"),
    ("TITLE", "title"),
    ("ASSIGNEE", lambda i: i.assignee_agent_id or i.assignee_user_id),
    ("RUN", lambda i: i.execution_run_id or i.checkout_run_id),
    ("ID", "id"),
]
COMMENT_COLUMNS: list[Column] = [
    ("WHEN", "created_at"),
    ("AUTHOR", lambda c: f"{c.author_type}:{c.author_agent_id or c.author_user_id or '-'}"),
    ("BODY", "body"),
]
#: What a checkout expects by default: any open status but in progress.
DEFAULT_EXPECTED = (
    IssueStatus.backlog,
    IssueStatus.todo,
    IssueStatus.blocked,
    IssueStatus.in_review,
)

IssueArg = Annotated[str, typer.Argument(help="Issue id or identifier (PAP-12).")]
CompanyOpt = Annotated[
    str,
    typer.Option("--company", "-c", envvar="PAPERCLIP_COMPANY", help="Company id or issue prefix."),
]


def _issue_statuses(values: list[IssueStatus]) -> list[Any]:

    return [proto_value(issues_pb2.IssueStatus, v) for v in values]


@app.command("list")
def list_issues(
    ctx: typer.Context,
    company: CompanyOpt,
    status: Annotated[
        list[IssueStatus] | None, typer.Option("--status", "-s", help="Only these (repeat).")
    ] = None,
    assignee: Annotated[str, typer.Option(help="Only those assigned to this agent id.")] = "",
    limit: Annotated[int, typer.Option(help="Show at most this many (0: all).")] = 50,
) -> None:
    """A company's issues."""

    async def work(client: PaperclipClient) -> None:
        company_uuid = await company_id(client, company)

        async def page(size: int, token: str) -> tuple[list[issues_pb2.Issue], str]:
            reply = await client.issues.ListIssues(
                issues_pb2.ListIssuesRequest(
                    company_id=company_uuid,
                    statuses=_issue_statuses(status or []),
                    assignee_agent_id=assignee,
                    page_size=size,
                    page_token=token,
                )
            )
            return list(reply.issues), reply.next_page_token

        output(ctx).listing(await collect(page, limit), COLUMNS, empty="no issues")

    call(ctx, work)


@app.command("show")
def show(
    ctx: typer.Context,
    issue: IssueArg,
    comments: Annotated[bool, typer.Option(help="Also list its comments.")] = True,
) -> None:
    """One issue (and its comments)."""

    async def work(client: PaperclipClient) -> None:
        found = await client.issues.GetIssue(issues_pb2.GetIssueRequest(issue=issue))
        notes: list[issues_pb2.Comment] = []
        if comments:

            async def page(size: int, token: str) -> tuple[list[issues_pb2.Comment], str]:
                reply = await client.issues.ListComments(
                    issues_pb2.ListCommentsRequest(
                        issue_id=found.id, page_size=size, page_token=token
                    )
                )
                return list(reply.comments), reply.next_page_token

            notes = await collect(page, 0)
        out = output(ctx)
        if out.as_json:
            body = to_dict(found)
            if comments:
                body["comments"] = [to_dict(c) for c in notes]
            out.data(body)
            return
        out.resource(found, title=f"{found.identifier}  {found.title}")
        if notes:
            out.table(
                [h for h, _ in COMMENT_COLUMNS],
                [
                    [
                        spec(c) if callable(spec) else format_field(c, spec)
                        for _, spec in COMMENT_COLUMNS
                    ]
                    for c in notes
                ],
                title="comments",
            )

    call(ctx, work)


@app.command("create")
def create(
    ctx: typer.Context,
    *,
    company: CompanyOpt,
    title: Annotated[str, typer.Argument(help="The issue's title.")],
    description: Annotated[str, typer.Option("--description", "-d")] = "",
    priority: Annotated[IssuePriority | None, typer.Option()] = None,
    status: Annotated[IssueStatus | None, typer.Option()] = None,
    assignee: Annotated[str, typer.Option(help="Agent id to assign it to.")] = "",
    parent: Annotated[str, typer.Option(help="Parent issue id or identifier.")] = "",
) -> None:
    """File an issue (assigning it to an agent wakes that agent)."""

    async def work(client: PaperclipClient) -> None:
        request = issues_pb2.CreateIssueRequest(
            company_id=await company_id(client, company),
            title=title,
            description=description,
            assignee_agent_id=assignee,
            parent_issue_id=await issue_id(client, parent) if parent else "",
            # Makes a repeat of this very request harmless.
            request_id=str(uuid.uuid4()),
        )
        if priority is not None:
            request.priority = proto_value(issues_pb2.IssuePriority, priority)
        if status is not None:
            request.status = proto_value(issues_pb2.IssueStatus, status)
        output(ctx).resource(await client.issues.CreateIssue(request))

    call(ctx, work)


def _update(ctx: typer.Context, issue: str, paths: list[str], **values: object) -> None:
    """UpdateIssue of ``paths`` with ``values`` on ``issue``."""

    async def work(client: PaperclipClient) -> None:
        changed = issues_pb2.Issue(id=await issue_id(client, issue), **values)  # type: ignore[arg-type]
        updated = await client.issues.UpdateIssue(
            issues_pb2.UpdateIssueRequest(
                issue=changed, update_mask=field_mask_pb2.FieldMask(paths=paths)
            )
        )
        output(ctx).resource(updated)

    call(ctx, work)


@app.command("assign")
def assign(
    ctx: typer.Context,
    issue: IssueArg,
    agent: Annotated[str, typer.Argument(help="Agent id (omit with --user or --nobody).")] = "",
    user: Annotated[str, typer.Option(help="Assign to this board user instead.")] = "",
    nobody: Annotated[bool, typer.Option("--nobody", help="Clear the assignee.")] = False,
) -> None:
    """Assign an issue to an agent (which wakes it), a user, or nobody."""
    if sum(bool(x) for x in (agent, user, nobody)) != 1:
        raise typer.BadParameter("give exactly one of AGENT, --user, --nobody")
    _update(
        ctx,
        issue,
        ["assignee_agent_id", "assignee_user_id"],
        assignee_agent_id=agent,
        assignee_user_id=user,
    )


@app.command("status")
def set_status(
    ctx: typer.Context,
    issue: IssueArg,
    status: Annotated[IssueStatus, typer.Argument(help="The new status.")],
) -> None:
    """Move an issue to another status."""

    _update(ctx, issue, ["status"], status=proto_value(issues_pb2.IssueStatus, status))


@app.command("comment")
def comment(
    ctx: typer.Context,
    issue: IssueArg,
    body: Annotated[str, typer.Argument(help="The comment (Markdown).")],
    reopen: Annotated[bool, typer.Option(help="Move a done or cancelled issue to todo.")] = False,
    interrupt: Annotated[bool, typer.Option(help="Cancel the run executing on the issue.")] = False,
) -> None:
    """Comment on an issue."""

    async def work(client: PaperclipClient) -> None:
        made = await client.issues.AddComment(
            issues_pb2.AddCommentRequest(
                issue_id=await issue_id(client, issue),
                body=body,
                reopen=reopen,
                interrupt=interrupt,
            )
        )
        output(ctx).resource(made)

    call(ctx, work)


@app.command("checkout")
def checkout(
    ctx: typer.Context,
    issue: IssueArg,
    agent: Annotated[str, typer.Option(help="The agent to check it out for.")],
    expect: Annotated[
        list[IssueStatus] | None,
        typer.Option(help="Statuses it must be in (repeat). [default: any open but in_progress]"),
    ] = None,
) -> None:
    """Check an issue out for an agent: assigned to it, in progress."""

    async def work(client: PaperclipClient) -> None:
        done = await client.issues.CheckoutIssue(
            issues_pb2.CheckoutIssueRequest(
                issue_id=await issue_id(client, issue),
                agent_id=agent,
                expected_statuses=_issue_statuses(expect or list(DEFAULT_EXPECTED)),
            )
        )
        output(ctx).resource(done)

    call(ctx, work)


@app.command("release")
def release(ctx: typer.Context, issue: IssueArg) -> None:
    """Give an issue up: unassigned, unlocked, back to todo when in progress."""

    async def work(client: PaperclipClient) -> None:
        done = await client.issues.ReleaseIssue(
            issues_pb2.ReleaseIssueRequest(issue_id=await issue_id(client, issue))
        )
        output(ctx).resource(done)

    call(ctx, work)


@app.command("force-release")
def force_release(
    ctx: typer.Context,
    issue: IssueArg,
    clear_assignee: Annotated[bool, typer.Option(help="Also unassign it.")] = False,
) -> None:
    """Board: clear every lock on an issue, whatever run holds it."""

    async def work(client: PaperclipClient) -> None:
        reply = await client.issues.ForceReleaseIssue(
            issues_pb2.ForceReleaseIssueRequest(
                issue_id=await issue_id(client, issue), clear_assignee=clear_assignee
            )
        )
        out = output(ctx)
        if out.as_json:
            out.data(to_dict(reply))
            return
        out.resource(reply.issue)
        out.note(
            "released: checkout run "
            f"{reply.previous_checkout_run_id or '-'}, execution run "
            f"{reply.previous_execution_run_id or '-'}"
        )

    call(ctx, work)
