"""``paperclip companies`` and ``paperclip issues`` against a real suite: the tables
people read, the JSON scripts read, and the exit code and hint of each error reason."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from paperclip.issues.v1 import issues_pb2
from tests.cli.conftest import Board, Cli
from tests.harness import unique_prefix

pytestmark = pytest.mark.e2e

AGENTS = Path(__file__).resolve().parents[1] / "agents"


@pytest.fixture(scope="module")
def company(board: Board) -> dict[str, str]:
    return board.company("CLI Issues Co")


@pytest.fixture(scope="module")
def agent(board: Board, company: dict[str, str]) -> dict[str, str]:
    """An agent that never wakes: the board's checkouts are the only ones."""
    return board.agent(
        company["id"], "quiet", sys.executable, str(AGENTS / "succeed.py"), wake_on_demand=False
    )


def test_companies_create_list_show(cli: Cli) -> None:
    prefix = unique_prefix()
    made = cli.ok("companies", "create", "Tables Inc", "--prefix", prefix)
    assert "Tables Inc" in made.stdout
    assert prefix in made.stdout

    listed = cli.json("companies", "list")
    mine = [c for c in listed if c["issue_prefix"] == prefix]
    assert len(mine) == 1
    assert mine[0]["name"] == "Tables Inc"
    assert mine[0]["status"] == "COMPANY_STATUS_ACTIVE"

    table = cli.ok("companies", "list").stdout
    header = table.splitlines()[1].split()
    assert header == ["ID", "PREFIX", "NAME", "STATUS"]
    row = next(line for line in table.splitlines() if prefix in line)
    assert mine[0]["id"] in row
    assert "active" in row

    by_prefix = cli.json("companies", "show", prefix)
    assert by_prefix["id"] == mine[0]["id"]
    by_id = cli.ok("companies", "show", mine[0]["id"]).stdout
    assert "issue_prefix" in by_id and prefix in by_id


def test_issue_create_list_show(cli: Cli, company: dict[str, str]) -> None:
    made = cli.json(
        "issues", "create", "-c", company["issue_prefix"], "Write the CLI",
        "--description", "Typer and Rich", "--priority", "high", "--status", "todo",
    )  # fmt: skip
    assert made["title"] == "Write the CLI"
    assert made["status"] == "ISSUE_STATUS_TODO"
    assert made["priority"] == "ISSUE_PRIORITY_HIGH"
    assert made["identifier"].startswith(company["issue_prefix"] + "-")

    human = cli.ok("issues", "list", "-c", company["id"]).stdout
    row = next(line for line in human.splitlines() if made["identifier"] in line)
    assert row.split()[:3] == [made["identifier"], "todo", "high"]
    assert made["id"] in row

    todo = cli.json("issues", "list", "-c", company["id"], "--status", "todo")
    assert made["id"] in [i["id"] for i in todo]
    done = cli.json("issues", "list", "-c", company["id"], "--status", "done")
    assert made["id"] not in [i["id"] for i in done]

    shown = cli.ok("issues", "show", made["identifier"]).stdout
    assert "Typer and Rich" in shown
    assert "status" in shown and "todo" in shown
    body = cli.json("issues", "show", made["id"])
    assert body["identifier"] == made["identifier"]
    assert body["comments"] == []


def test_issue_assign_status_comment(
    cli: Cli, board: Board, company: dict[str, str], agent: dict[str, str]
) -> None:
    issue = board.issue(company["id"], "Triage me")
    assigned = cli.json("issues", "assign", issue["identifier"], agent["id"])
    assert assigned["assignee_agent_id"] == agent["id"]
    to_user = cli.json("issues", "assign", issue["id"], "--user", "local-board")
    assert to_user["assignee_user_id"] == "local-board"
    assert "assignee_agent_id" not in to_user
    cleared = cli.ok("issues", "assign", issue["id"], "--nobody").stdout
    assert issue["identifier"] in cleared
    assert "assignee" not in cleared  # empty fields are left out

    blocked = cli.ok("issues", "status", issue["identifier"], "blocked").stdout
    assert "blocked" in blocked
    assert cli.json("issues", "show", issue["id"])["status"] == "ISSUE_STATUS_BLOCKED"

    note = cli.json("issues", "comment", issue["identifier"], "Looking into it")
    assert note["body"] == "Looking into it"
    assert note["author_type"] == "user"
    shown = cli.ok("issues", "show", issue["identifier"]).stdout
    assert "Looking into it" in shown
    assert "user:local-board" in shown
    assert [c["body"] for c in cli.json("issues", "show", issue["id"])["comments"]] == [
        "Looking into it"
    ]


def test_checkout_release_force_release(
    cli: Cli, board: Board, company: dict[str, str], agent: dict[str, str]
) -> None:
    issue = board.issue(company["id"], "Take it", status=issues_pb2.ISSUE_STATUS_TODO)
    out = cli.json("issues", "checkout", issue["identifier"], "--agent", agent["id"])
    assert out["status"] == "ISSUE_STATUS_IN_PROGRESS"
    assert out["assignee_agent_id"] == agent["id"]

    released = cli.json("issues", "release", issue["id"])
    assert released["status"] == "ISSUE_STATUS_TODO"
    assert "assignee_agent_id" not in released

    again = cli.ok("issues", "checkout", issue["id"], "--agent", agent["id"], "--expect", "todo")
    assert "in_progress" in again.stdout
    assert agent["id"] in again.stdout
    forced = cli.json("issues", "force-release", issue["identifier"], "--clear-assignee")
    assert forced["issue"]["status"] == "ISSUE_STATUS_TODO"
    assert "assignee_agent_id" not in forced["issue"]
    human = cli.ok("issues", "force-release", issue["identifier"])
    assert issue["identifier"] in human.stdout
    assert "released: checkout run" in human.stderr


def test_checkout_conflict_exits_4_and_says_why(
    cli: Cli, board: Board, company: dict[str, str], agent: dict[str, str]
) -> None:
    issue = board.issue(company["id"], "Wrong status", status=issues_pb2.ISSUE_STATUS_TODO)
    human = cli.run(
        "issues", "checkout", issue["id"], "--agent", agent["id"], "--expect", "in_review"
    )
    assert human.code == 4
    assert human.stdout == ""
    assert "error: ISSUE_CHECKOUT_CONFLICT" in human.stderr
    assert "conflict=status" in human.stderr
    assert "hint: the issue is todo, not in an expected status; pass --expect todo" in human.stderr

    scripted = cli.run(
        "--json", "issues", "checkout", issue["id"], "--agent", agent["id"], "--expect", "in_review"
    )
    assert scripted.code == 4
    error = scripted.error()
    assert error["code"] == "FAILED_PRECONDITION"
    assert error["reason"] == "ISSUE_CHECKOUT_CONFLICT"
    assert error["metadata"]["holder_live"] == "false"
    assert error["exit_code"] == 4


def test_not_found_exits_3(cli: Cli, company: dict[str, str]) -> None:
    missing = cli.run("issues", "show", f"{company['issue_prefix']}-9999")
    assert missing.code == 3
    assert "error: ISSUE_NOT_FOUND" in missing.stderr
    assert "hint: check the id (paperclip issues list --company COMPANY)" in missing.stderr

    scripted = cli.run("--json", "companies", "show", str(uuid.uuid4()))
    assert scripted.code == 3
    assert scripted.error()["reason"] == "COMPANY_NOT_FOUND"

    no_prefix = cli.run("issues", "list", "-c", "NOSUCHPREFIX")
    assert no_prefix.code == 3
    assert "no company with the id or issue prefix 'NOSUCHPREFIX'" in no_prefix.stderr


def test_invalid_argument_exits_2_with_the_field(cli: Cli, company: dict[str, str]) -> None:
    empty = cli.run("issues", "create", "-c", company["id"], "")
    assert empty.code == 2
    assert "error: INVALID_ARGUMENT: title: is required" in empty.stderr

    scripted = cli.run("--json", "issues", "create", "-c", company["id"], "")
    assert scripted.code == 2
    error = scripted.error()
    assert error["reason"] == "INVALID_ARGUMENT"
    assert error["violations"] == [{"field": "title", "description": "is required"}]

    bad_choice = cli.run("issues", "status", "PAP-1", "finished")
    assert bad_choice.code == 2
    assert "Invalid value" in bad_choice.stderr


def test_taken_prefix_exits_4(cli: Cli, company: dict[str, str]) -> None:
    taken = cli.run("--json", "companies", "create", "Copycat", "--prefix", company["issue_prefix"])
    assert taken.code == 4
    assert taken.error()["reason"] == "ISSUE_PREFIX_TAKEN"
