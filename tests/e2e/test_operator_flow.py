"""The operator flow of ``make run``: nothing but grpcurl and the board token the launcher
wrote. The suite runs as ``python -m local_suite.launcher`` on its own ``PAPERCLIP_HOME`` and
public port; every call below goes through the gateway, as an operator's would."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.harness import unique_prefix

pytestmark = pytest.mark.e2e

GRPCURL = str(Path(sys.executable).with_name("grpcurl"))
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Launcher:
    """One ``python -m local_suite.launcher`` process on a given home and gateway address."""

    def __init__(
        self, home: Path, gateway: str, log: Path, extra: dict[str, str] | None = None
    ) -> None:
        self.home = home
        self.gateway = gateway
        self.log = log
        self.ready = home / "suite.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAPERCLIP_")}
        env.update(
            PAPERCLIP_HOME=str(home),
            PAPERCLIP_GATEWAY_ADDR=gateway,
            PAPERCLIP_READY_FILE=str(self.ready),
        )
        env.update(extra or {})
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "local_suite.launcher"],
                env=env,
                start_new_session=True,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        #: Every process the suite started, recorded once it is up (for the cleanup check).
        self.children: list[psutil.Process] = []

    def wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the suite did not start:\n{self.output()[-3000:]}")
            time.sleep(0.1)
        self.children = _descendants(self.proc.pid)
        body: dict[str, Any] = json.loads(self.ready.read_text())
        return body

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def postgres(self) -> list[psutil.Process]:
        """PostgreSQL processes serving this home's data directory."""
        pgdata = str(self.home / "pgdata")
        found = []
        for proc in psutil.process_iter(["name", "cmdline"]):
            with contextlib.suppress(psutil.Error):
                if proc.info["name"] == "postgres" and pgdata in " ".join(
                    proc.info["cmdline"] or ()
                ):
                    found.append(proc)
        return found

    def stop(self) -> int:
        """SIGTERM, as Ctrl-C would; the launcher's exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=STOP_TIMEOUT_S)

    def kill(self) -> None:
        """Last resort after a failure: this launcher and what it started, by pid."""
        victims = [*self.children, *_descendants(self.proc.pid)]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for proc in [*victims, *self.postgres()]:
            with contextlib.suppress(psutil.Error):
                if proc.is_running():
                    proc.kill()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def _assert_stopped_cleanly(launcher: Launcher) -> None:
    children = launcher.children
    assert children, "the launcher should have had child processes"
    assert launcher.stop() == 0, launcher.output()[-3000:]
    deadline = time.monotonic() + 5
    while (_alive(children) or launcher.postgres()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _alive(children) == []
    assert launcher.postgres() == []


class Operator:
    """grpcurl against the gateway, as the board token's holder."""

    def __init__(self, gateway: str, token: str) -> None:
        self.gateway = gateway
        self.token = token

    def run(self, *args: str, token: str | None = "") -> subprocess.CompletedProcess[str]:
        """``grpcurl -plaintext [-H authorization] ARGS``; ``token=None`` sends none."""
        bearer = self.token if token == "" else token
        auth = [] if bearer is None else ["-H", f"authorization: Bearer {bearer}"]
        return subprocess.run(
            [GRPCURL, "-plaintext", *auth, *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def call(self, method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """A successful call's JSON response."""
        result = self.run("-d", json.dumps(body or {}), self.gateway, method)
        assert result.returncode == 0, f"{method}: {result.stderr}"
        reply: dict[str, Any] = json.loads(result.stdout)
        return reply


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("operator-home")


@pytest.fixture(scope="module")
def suite(home: Path) -> Iterator[Launcher]:
    launcher = Launcher(home, f"127.0.0.1:{_free_port()}", home.parent / "launcher-1.log")
    try:
        launcher.wait_ready()
        yield launcher
    finally:
        launcher.kill()


@pytest.fixture(scope="module")
def operator(suite: Launcher) -> Operator:
    token = (suite.home / "board-token").read_text().strip()
    assert token
    return Operator(suite.gateway, token)


def test_suite_announces_the_gateway_and_the_token_file(suite: Launcher) -> None:
    body = json.loads(suite.ready.read_text())
    assert body["services"]["gateway"] == suite.gateway
    banner = suite.output()
    assert suite.gateway in banner
    assert str(suite.home / "board-token") in banner


def test_board_token_file_is_private(suite: Launcher) -> None:
    mode = (suite.home / "board-token").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600


def test_list_shows_public_services_only(operator: Operator) -> None:
    listed = operator.run(operator.gateway, "list")
    assert listed.returncode == 0, listed.stderr
    services = listed.stdout.split()
    for public in (
        "paperclip.issues.v1.IssueService",
        "paperclip.runs.v1.RunService",
        "paperclip.gateway.v1.AuthService",
    ):
        assert public in services
    assert "paperclip.issues.v1.IssueLockService" not in services


def test_describe_a_service(operator: Operator) -> None:
    described = operator.run(operator.gateway, "describe", "paperclip.issues.v1.IssueService")
    assert described.returncode == 0, described.stderr
    assert "rpc CheckoutIssue" in described.stdout
    assert "rpc ForceReleaseIssue" in described.stdout
    auth = operator.run(operator.gateway, "describe", "paperclip.gateway.v1.AuthService")
    assert "rpc CreateApiKey" in auth.stdout


def test_checkout_and_force_release_leave_an_audit_trail(operator: Operator) -> None:
    company = operator.call(
        "paperclip.issues.v1.IssueService/CreateCompany",
        {"name": "Operator Co", "issue_prefix": unique_prefix()},
    )
    agent = operator.call(
        "paperclip.runs.v1.RunService/CreateAgent",
        {
            "company_id": company["id"],
            "name": "builder",
            "adapter_type": "process",
            "adapter_config": {"command": ["echo", "hello"]},
            # No wakes: the assignment below must not start a run that takes the
            # issue before the board checks it out.
            "runtime_config": {"wake_on_demand": False},
        },
    )
    issue = operator.call(
        "paperclip.issues.v1.IssueService/CreateIssue",
        {
            "company_id": company["id"],
            "title": "Ship it",
            "assignee_agent_id": agent["id"],
            "status": "ISSUE_STATUS_TODO",
        },
    )
    assert issue["status"] == "ISSUE_STATUS_TODO"
    checked_out = operator.call(
        "paperclip.issues.v1.IssueService/CheckoutIssue",
        {
            "issue_id": issue["id"],
            "agent_id": agent["id"],
            "expected_statuses": ["ISSUE_STATUS_TODO"],
        },
    )
    assert checked_out["status"] == "ISSUE_STATUS_IN_PROGRESS"
    assert checked_out["assignee_agent_id"] == agent["id"]
    released = operator.call(
        "paperclip.issues.v1.IssueService/ForceReleaseIssue",
        {"issue_id": issue["id"], "clear_assignee": True},
    )
    assert released["issue"]["status"] == "ISSUE_STATUS_TODO"
    assert "assignee_agent_id" not in released["issue"]
    trail = operator.call(
        "paperclip.issues.v1.IssueService/ListActivity",
        {"company_id": company["id"], "entity_type": "issue", "entity_id": issue["id"]},
    )
    actions = [entry["action"] for entry in trail["entries"]]
    wanted = ["issue.admin_force_release", "issue.checked_out", "issue.created"]
    assert [a for a in actions if a in wanted] == wanted, actions
    assert actions[0] == "issue.admin_force_release"
    assert {entry["actor_id"] for entry in trail["entries"]} == {"local-board"}


def test_an_issue_worktree_with_a_dev_server_closes_with_its_issue(
    operator: Operator, tmp_path: Path
) -> None:
    """The README's workspace flow: a worktree for an issue and a dev server on a port
    reserved for it; the server stops when the issue is done; archiving removes the
    worktree."""
    company = operator.call(
        "paperclip.issues.v1.IssueService/CreateCompany",
        {"name": "Workspace Co", "issue_prefix": unique_prefix()},
    )
    issue = operator.call(
        "paperclip.issues.v1.IssueService/CreateIssue",
        {"company_id": company["id"], "title": "Add Worktree Support"},
    )
    repo = tmp_path / "repo"
    identity = ["-c", "user.name=Operator", "-c", "user.email=operator@example.com"]
    subprocess.run(["git", "init", "-q", "-b", "master", str(repo)], check=True)
    subprocess.run(
        ["git", *identity, "-C", str(repo), "commit", "-q", "--allow-empty", "-m", "init"],
        check=True,
    )
    workspace = operator.call(
        "paperclip.workspaces.v1.WorkspaceService/CreateExecutionWorkspace",
        {
            "company_id": company["id"],
            "strategy_type": "WORKSPACE_STRATEGY_GIT_WORKTREE",
            "repo_path": str(repo),
            "source_issue_id": issue["id"],
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
    )
    assert workspace["branch_name"] == f"{issue['identifier']}-add-worktree-support"
    assert Path(workspace["cwd"]).is_dir()
    started = operator.call(
        "paperclip.workspaces.v1.WorkspaceService/ControlRuntimeServices",
        {"workspace_id": workspace["id"], "action": "RUNTIME_ACTION_START"},
    )
    service = started["workspace"]["runtime_services"][0]
    assert service["status"] == "RUNTIME_SERVICE_STATUS_RUNNING"
    with urllib.request.urlopen(service["url"], timeout=5) as response:
        assert response.status == 200
    operator.call(
        "paperclip.issues.v1.IssueService/UpdateIssue",
        {
            "issue": {"id": issue["id"], "status": "ISSUE_STATUS_DONE"},
            "update_mask": {"paths": ["status"]},
        },
    )
    deadline = time.monotonic() + 30
    while True:
        listed = operator.call(
            "paperclip.workspaces.v1.WorkspaceService/ListRuntimeServices",
            {"workspace_id": workspace["id"]},
        )
        if listed["services"][0]["status"] == "RUNTIME_SERVICE_STATUS_STOPPED":
            break
        assert time.monotonic() < deadline, listed
        time.sleep(0.2)
    assert not psutil.pid_exists(service["pid"])
    readiness = operator.call(
        "paperclip.workspaces.v1.WorkspaceService/GetCloseReadiness",
        {"workspace_id": workspace["id"]},
    )
    assert readiness["state"] == "CLOSE_READINESS_STATE_READY", readiness
    archived = operator.call(
        "paperclip.workspaces.v1.WorkspaceService/ArchiveExecutionWorkspace",
        {"workspace_id": workspace["id"]},
    )
    assert archived["workspace"]["status"] == "WORKSPACE_STATUS_ARCHIVED"
    assert not Path(workspace["cwd"]).exists()


def test_whoami_is_the_local_board_admin(operator: Operator) -> None:
    me = operator.call("paperclip.gateway.v1.AuthService/WhoAmI")
    assert me["type"] == "ACTOR_TYPE_BOARD"
    assert me["user_id"] == "local-board"
    assert me["is_instance_admin"] is True


def test_call_without_token_is_unauthenticated(operator: Operator) -> None:
    result = operator.run(
        "-d", "{}", operator.gateway, "paperclip.issues.v1.IssueService/ListCompanies", token=None
    )
    assert result.returncode != 0
    assert "Code: Unauthenticated" in result.stderr
    assert "google.rpc.ErrorInfo" in result.stderr
    assert '"reason":"UNAUTHENTICATED"' in result.stderr


def test_sigterm_stops_everything_and_a_restart_reuses_the_token(
    suite: Launcher, home: Path
) -> None:
    token = (home / "board-token").read_bytes()
    _assert_stopped_cleanly(suite)

    second = Launcher(home, f"127.0.0.1:{_free_port()}", home.parent / "launcher-2.log")
    try:
        second.wait_ready()
        assert (home / "board-token").read_bytes() == token
        assert stat.S_IMODE((home / "board-token").stat().st_mode) == 0o600
        me = Operator(second.gateway, token.decode().strip()).call(
            "paperclip.gateway.v1.AuthService/WhoAmI"
        )
        assert me["user_id"] == "local-board"
        _assert_stopped_cleanly(second)
    finally:
        second.kill()
