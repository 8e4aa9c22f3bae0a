"""``paperclip agents``, ``paperclip runs`` and ``paperclip status`` against a real suite
running real agent processes."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from paperclip.issues.v1 import issues_pb2
from tests.cli.conftest import Board, Cli, read_until

pytestmark = pytest.mark.e2e

AGENTS = Path(__file__).resolve().parents[1] / "agents"


@pytest.fixture(scope="module")
def company(board: Board) -> dict[str, Any]:
    return board.company("CLI Runs Co")


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """``check()``'s first truthy value, polled."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def test_agent_create_list_show(cli: Cli, company: dict[str, Any]) -> None:
    made = cli.json(
        "agents", "create", "-c", company["issue_prefix"], "builder", "--role", "engineer",
        "--env", "GREETING=hi", "--max-concurrent-runs", "2", "--timeout", "60",
        "--", sys.executable, str(AGENTS / "succeed.py"), "--flag",
    )  # fmt: skip
    assert made["adapter_config"]["command"] == [
        sys.executable,
        str(AGENTS / "succeed.py"),
        "--flag",
    ]
    assert made["adapter_config"]["env"] == {"GREETING": "hi"}
    assert made["runtime_config"]["max_concurrent_runs"] == 2
    assert made["runtime_config"]["timeout_seconds"] == 60
    assert made["status"] == "AGENT_STATUS_ACTIVE"

    listed = cli.ok("agents", "list", "-c", company["id"]).stdout
    assert listed.splitlines()[1].split() == ["ID", "NAME", "STATUS", "ROLE", "COMMAND"]
    row = next(line for line in listed.splitlines() if made["id"] in line)
    assert row.split()[1:4] == ["builder", "active", "engineer"]
    assert [a["id"] for a in cli.json("agents", "list", "-c", company["id"])] == [made["id"]]

    shown = cli.ok("agents", "show", made["id"]).stdout
    assert "max_concurrent_runs" in shown
    assert "GREETING=hi" not in shown  # env is part of adapter_config's JSON
    assert '"GREETING":"hi"' in shown


def test_pause_resume_terminate(cli: Cli, board: Board, company: dict[str, Any]) -> None:
    agent = board.agent(company["id"], "sleeper", "true")
    assert cli.json("agents", "pause", agent["id"])["status"] == "AGENT_STATUS_PAUSED"
    skipped = cli.ok("agents", "wake", agent["id"], "--reason", "try")
    assert "skipped (agent_paused)" in skipped.stdout
    resumed = cli.ok("agents", "resume", agent["id"]).stdout
    assert next(line for line in resumed.splitlines() if "status" in line).split() == [
        "status",
        "active",
    ]
    assert "terminated" in cli.ok("agents", "terminate", agent["id"]).stdout

    again = cli.run("--json", "agents", "resume", agent["id"])
    assert again.code == 4
    assert again.error()["reason"] == "AGENT_TERMINATED"
    nothing = cli.run("agents", "wake", agent["id"], "--watch")
    assert nothing.code == 4
    assert "nothing to watch" in nothing.stderr

    missing = cli.run("--json", "agents", "show", "6f9619ff-8b86-d011-b42d-00c04fc964ff")
    assert missing.code == 3
    assert missing.error()["reason"] == "AGENT_NOT_FOUND"


def test_a_running_run_in_status_then_cancelled(
    cli: Cli, board: Board, company: dict[str, Any]
) -> None:
    agent = board.agent(company["id"], "long", sys.executable, str(AGENTS / "sleep.py"), "60")
    issue = board.issue(company["id"], "Held", status=issues_pb2.ISSUE_STATUS_TODO)
    woken = cli.json(
        "agents", "wake", agent["id"], "--reason", "work", "--issue", issue["identifier"]
    )
    assert woken["wakeup_request"]["status"] == "WAKEUP_STATUS_QUEUED"
    run_id = woken["run"]["id"]
    assert woken["run"]["issue_id"] == issue["id"]
    watcher = cli.popen("runs", "watch", run_id)
    assert watcher.stderr is not None
    read_until(watcher.stderr, "* lifecycle: run started")

    # The run holds the issue's execution lock: a checkout for another agent names it.
    other = board.agent(company["id"], "other", "true", wake_on_demand=False)
    conflict = cli.run("issues", "checkout", issue["id"], "--agent", other["id"])
    assert conflict.code == 4
    assert "conflict=live_holder" in conflict.stderr
    assert f"hint: run {run_id} holds it and is live" in conflict.stderr
    assert f"paperclip runs cancel {run_id}" in conflict.stderr

    running = cli.json("runs", "list", "-c", company["id"], "--status", "running")
    assert [r["id"] for r in running] == [run_id]
    table = cli.ok("runs", "list", "-c", company["id"], "--agent", agent["id"]).stdout
    assert next(line for line in table.splitlines() if run_id in line).split()[1] == "running"

    status = cli.json("status")
    assert set(status["health"].values()) == {"SERVING"}
    mine = next(c for c in status["companies"] if c["company_id"] == company["id"])
    assert mine["running_by_agent"] == {agent["id"]: 1}
    assert mine["queued"] == 0
    assert isinstance(status["queue_depth"], int)
    human = cli.ok("status")
    assert "paperclip.runs.v1.RunService" in human.stdout
    assert "queue depth:" in human.stdout
    row = next(line for line in human.stdout.splitlines() if agent["id"] in line)
    assert row.split()[:2] == [company["issue_prefix"], "long"]
    assert "not shown: deferred wakes" in human.stderr

    assert run_id in cli.ok("runs", "cancel", run_id, "--reason", "enough").stdout
    # The watch that saw the run start ends with it, with the code of a failed run.
    assert watcher.wait(timeout=30) == 7
    assert f"* run {run_id} cancelled" in watcher.stderr.read().decode()
    shown = cli.json("runs", "show", run_id)
    assert shown["status"] == "RUN_STATUS_CANCELLED"
    assert shown["error_code"] == "cancelled"
    assert "cancelled" in cli.ok("runs", "show", run_id).stdout


def test_logs_of_a_finished_run_in_order(cli: Cli, board: Board, company: dict[str, Any]) -> None:
    agent = board.agent(
        company["id"], "counter", sys.executable, str(AGENTS / "sleep.py"), "0.5", "0.1"
    )
    run_id = board.wake(agent["id"])
    assert cli.run("runs", "watch", run_id).code == 0
    logs = cli.ok("runs", "logs", run_id)
    lines = logs.stdout.splitlines()
    assert lines[-1] == "done"
    assert lines[:-1] == [f"progress {i}" for i in range(len(lines) - 1)]
    assert "* lifecycle: run succeeded" in logs.stderr
    events = [line for line in cli.ok("--json", "runs", "logs", run_id).stdout.splitlines() if line]
    seqs = [int(json.loads(e)["seq"]) for e in events]
    assert seqs == sorted(seqs)
    assert json.loads(events[-1])["type"] == "RUN_EVENT_TYPE_LIFECYCLE"


def test_status_lists_an_issue_whose_run_failed_as_stranded(
    cli: Cli, board: Board, company: dict[str, Any]
) -> None:
    agent = board.agent(company["id"], "failer", sys.executable, str(AGENTS / "fail.py"))
    issue = board.issue(company["id"], "Doomed", assignee_agent_id=agent["id"])

    def stranded() -> list[dict[str, str]]:
        body = cli.json("status")
        mine = next(c for c in body["companies"] if c["company_id"] == company["id"])
        return [s for s in mine["stranded"] if s["issue_id"] == issue["id"]]

    found = wait_for(stranded, "the issue to be stranded")
    assert found[0]["latest_run_status"] == "RUN_STATUS_FAILED"
    assert found[0]["agent_id"] == agent["id"]
    human = cli.ok("status").stdout
    row = next(line for line in human.splitlines() if issue["id"] in line)
    assert row.split()[0] == issue["identifier"]
    assert "failer" in row
