"""``paperclip workspaces``, ``leases``, ``keys`` and ``whoami`` against a real suite,
and what a refused token exits with."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from paperclip_client import PaperclipClient

from paperclip.workspaces.v1 import workspaces_pb2
from tests.cli.conftest import Board, Cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def company(board: Board) -> dict[str, Any]:
    return board.company("CLI Workspace Co")


def make_workspace(cli: Cli, company_id: str, cwd: Path) -> str:
    """A directory workspace with one web service (the CLI does not create workspaces)."""
    request = json_format.ParseDict(
        {
            "company_id": company_id,
            "name": "scratch",
            "strategy_type": "WORKSPACE_STRATEGY_PROJECT_PRIMARY",
            "cwd": str(cwd),
            "config": {
                "runtime": {
                    "services": [
                        {
                            "name": "web",
                            "auto_port": True,
                            "command": "exec python3 -m http.server $PORT --bind 127.0.0.1",
                            "url": "http://127.0.0.1:{{port}}/",
                        }
                    ]
                }
            },
        },
        workspaces_pb2.CreateExecutionWorkspaceRequest(),
    )
    token = (cli.home / "board-token").read_text()

    async def create() -> str:
        async with PaperclipClient(cli.gateway, token) as client:
            made = await client.workspaces.CreateExecutionWorkspace(request)
            return made.id

    return asyncio.run(create())


def test_workspace_services_readiness_lease_archive(
    cli: Cli, company: dict[str, Any], tmp_path: Path
) -> None:
    workspace = make_workspace(cli, company["id"], tmp_path / "scratch")
    listed = cli.ok("workspaces", "list", "-c", company["issue_prefix"]).stdout
    row = next(line for line in listed.splitlines() if workspace in line)
    assert row.split()[1:4] == ["scratch", "active", "project_primary"]
    assert cli.json("workspaces", "show", workspace)["cwd"] == str(tmp_path / "scratch")

    started = cli.json("workspaces", "services", "start", workspace)
    service = started["workspace"]["runtime_services"][0]
    assert service["status"] == "RUNTIME_SERVICE_STATUS_RUNNING"
    with urllib.request.urlopen(service["url"], timeout=5) as response:
        assert response.status == 200
    table = cli.ok("workspaces", "services", "list", workspace).stdout
    row = next(line for line in table.splitlines() if service["id"] in line)
    assert row.split()[1:4] == ["web", "0", "running"]

    readiness = cli.ok("workspaces", "readiness", workspace).stdout
    assert "ready_with_warnings" in readiness
    assert "stop_runtime_services" in readiness
    assert cli.json("workspaces", "readiness", workspace)["state"] == (
        "CLOSE_READINESS_STATE_READY_WITH_WARNINGS"
    )

    environment = str(uuid.uuid4())
    lease = cli.json(
        "leases", "acquire", "-c", company["id"], "--environment", environment,
        "--workspace", workspace, "--ttl", "60",
    )  # fmt: skip
    assert lease["status"] == "LEASE_STATUS_ACTIVE"
    renewed = cli.ok("leases", "renew", lease["id"], "--ttl", "120").stdout
    assert lease["id"] in renewed and environment in renewed
    released = cli.json("leases", "release", lease["id"])
    assert released["status"] == "LEASE_STATUS_RELEASED"

    stopped = cli.ok("workspaces", "services", "stop", workspace, "--index", "0").stdout
    assert "stopped" in stopped
    archived = cli.json("workspaces", "archive", workspace)
    assert archived["workspace"]["status"] == "WORKSPACE_STATUS_ARCHIVED"
    assert not (tmp_path / "scratch").exists()

    missing = cli.run("workspaces", "readiness", str(uuid.uuid4()))
    assert missing.code == 3
    assert "WORKSPACE_NOT_FOUND" in missing.stderr


def test_keys_create_use_revoke(cli: Cli, company: dict[str, Any]) -> None:
    me = cli.ok("whoami").stdout
    assert "local-board" in me
    assert cli.json("whoami")["is_instance_admin"] is True

    created = cli.json(
        "keys", "create", "viewer-user", "--name", "laptop", "--member", f"{company['id']}:viewer"
    )
    token = created["token"]
    assert created["api_key"]["memberships"] == [
        {"company_id": company["id"], "role": "ROLE_VIEWER"}
    ]
    as_viewer = {"PAPERCLIP_TOKEN": token}
    assert cli.ok("--json", "whoami", **as_viewer).json()["user_id"] == "viewer-user"
    assert cli.ok("issues", "list", "-c", company["id"], **as_viewer).code == 0

    denied = cli.run("issues", "create", "-c", company["id"], "Not mine", **as_viewer)
    assert denied.code == 5
    assert "error: COMPANY_ACCESS_DENIED" in denied.stderr
    assert "role=viewer" in denied.stderr
    assert "keys create USER --member" in denied.stderr
    admin_only = cli.run("--json", "keys", "create", "someone", **as_viewer)
    assert admin_only.code == 5

    revoked = cli.ok("keys", "revoke", created["api_key"]["id"]).stdout
    assert "revoked_at" in revoked
    refused = cli.run("--json", "whoami", **as_viewer)
    assert refused.code == 5
    assert refused.error()["reason"] == "API_KEY_REVOKED"
    assert "no longer works" in refused.error()["hint"]

    human = cli.ok("keys", "create", "other-user", "--name", "ci")
    assert human.stdout.splitlines()[-1].startswith("token: ")
    assert "not shown again" in human.stderr


def test_unknown_token_exits_5_and_says_where_tokens_come_from(cli: Cli) -> None:
    refused = cli.run("--token", "not-a-real-token", "companies", "list")
    assert refused.code == 5
    assert refused.stdout == ""
    assert "error: UNAUTHENTICATED" in refused.stderr
    assert "board-token" in refused.stderr
    scripted = cli.run("--json", "companies", "list", PAPERCLIP_TOKEN="not-a-real-token")
    assert scripted.code == 5
    assert scripted.error()["code"] == "UNAUTHENTICATED"
