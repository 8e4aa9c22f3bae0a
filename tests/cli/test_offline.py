"""What ``paperclip`` does without a suite to talk to: a gateway that is down, no token,
bad usage; and the start-up work it leaves for later."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.cli.conftest import PAPERCLIP, Result, clean_env, free_port


def run(*args: str, **env: str) -> Result:
    done = subprocess.run(
        [PAPERCLIP, *args],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def test_a_gateway_that_is_down_exits_6(tmp_path: Path) -> None:
    down = f"127.0.0.1:{free_port()}"
    human = run("--gateway", down, "--token", "t", "issues", "list", "-c", "PAP")
    assert human.code == 6
    assert "error: UNAVAILABLE" in human.stderr
    assert f"is the suite running at {down}?" in human.stderr
    scripted = run("--json", "companies", "list", PAPERCLIP_GATEWAY_ADDR=down, PAPERCLIP_TOKEN="t")
    assert scripted.code == 6
    assert scripted.error()["code"] == "UNAVAILABLE"
    assert scripted.error()["exit_code"] == 6


def test_no_token_exits_5_before_calling(tmp_path: Path) -> None:
    result = run("companies", "list", PAPERCLIP_HOME=str(tmp_path))
    assert result.code == 5
    assert f"nothing in {tmp_path / 'board-token'}" in result.stderr
    assert "PAPERCLIP_TOKEN" in result.stderr


def test_the_board_token_file_of_the_home_is_used(tmp_path: Path) -> None:
    (tmp_path / "board-token").write_text("from-the-file\n")
    down = f"127.0.0.1:{free_port()}"
    # It gets as far as calling the gateway (down), so the token was found.
    assert run("whoami", "--help").code == 0
    assert run("whoami", PAPERCLIP_HOME=str(tmp_path), PAPERCLIP_GATEWAY_ADDR=down).code == 6


def test_usage_errors_exit_2() -> None:
    missing = run("issues", "list")
    assert missing.code == 2
    assert "Missing option '--company'" in missing.stderr
    unknown = run("issues", "frobnicate")
    assert unknown.code == 2
    bad_env = run("agents", "create", "-c", "X", "n", "--env", "novalue", "--", "true")
    assert bad_env.code == 2
    assert "expected KEY=VALUE" in bad_env.stderr
    both = run("issues", "assign", "PAP-1", "agent", "--nobody")
    assert both.code == 2


def test_help_lists_every_command_group() -> None:
    result = run("--help")
    assert result.code == 0
    for group in ("companies", "issues", "agents", "runs", "workspaces", "leases", "keys"):
        assert group in result.stdout
    assert "status" in result.stdout
    assert "Exit codes" in result.stdout
    issues = run("issues", "--help").stdout
    for command in ("list", "show", "create", "assign", "status", "comment", "checkout"):
        assert command in issues
    assert "force-release" in issues


def test_shell_completion_script_and_completions() -> None:
    # Named explicitly: by itself Typer picks the shell among the parent processes,
    # which a test run need not have.
    script = run("--show-completion", "bash", _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    assert script.code == 0
    assert "_PAPERCLIP_COMPLETE" in script.stdout
    completed = run(_PAPERCLIP_COMPLETE="complete_bash", COMP_WORDS="paperclip iss", COMP_CWORD="1")
    assert "issues" in completed.stdout
    statuses = run(
        _PAPERCLIP_COMPLETE="complete_bash",
        COMP_WORDS="paperclip issues status PAP-1 in_",
        COMP_CWORD="4",
    )
    assert "in_progress" in statuses.stdout
    assert "in_review" in statuses.stdout


def test_start_up_leaves_grpc_and_the_stubs_unimported() -> None:
    probe = (
        "import sys, paperclip_cli.main; "
        "print(sorted(m for m in ('grpc', 'google.protobuf', 'rich', 'paperclip_client.client') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"
