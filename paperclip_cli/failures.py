"""A failed command on stderr: the reason, the details that matter, and what to do.

People get ``error: REASON: message`` and a ``hint:`` line; ``--json`` writes one JSON
object (``{"error": {code, reason, message, metadata, violations, hint, exit_code}}``)
instead. The exit code follows the gRPC code (``exit_codes``).
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from paperclip_cli.exit_codes import ExitCode, exit_code_for

if TYPE_CHECKING:
    from common.errors import PaperclipError
    from paperclip_cli.connection import CliFailure, Connection
    from paperclip_cli.output import Output

#: Where to look up the right id, by the resource a NOT_FOUND reason names.
_LISTS = {
    "COMPANY": "paperclip companies list",
    "ISSUE": "paperclip issues list --company COMPANY",
    "AGENT": "paperclip agents list --company COMPANY",
    "RUN": "paperclip runs list --company COMPANY",
    "WORKSPACE": "paperclip workspaces list --company COMPANY",
    "API_KEY": "the id printed by `paperclip keys create`",
}

_TOKEN_HELP = (
    "use a board key: the suite writes its instance-admin key to $PAPERCLIP_HOME/board-token "
    "(`make run`); pass --token / PAPERCLIP_TOKEN, or ask an instance admin for one "
    "(`paperclip keys create USER`)"
)


def hint_for(error: PaperclipError, connection: Connection) -> str:
    """What the operator can do about ``error``."""
    reason, meta = error.reason, error.metadata
    if reason == "ISSUE_CHECKOUT_CONFLICT":
        return _checkout_conflict(meta)
    if reason == "ISSUE_OWNERSHIP_CONFLICT":
        holder = meta.get("checkout_run_id") or meta.get("execution_run_id") or "another run"
        return (
            f"the issue is held by run {holder}; take it back with "
            "`paperclip issues force-release ISSUE`"
        )
    if reason in ("API_KEY_REVOKED", "RUN_TOKEN_REVOKED", "RUN_TOKEN_EXPIRED"):
        return f"this token ({connection.token_source}) no longer works; {_TOKEN_HELP}"
    if error.code.name == "UNAUTHENTICATED":
        return f"the gateway refused the token from {connection.token_source}; {_TOKEN_HELP}"
    if reason == "COMPANY_ACCESS_DENIED":
        role = meta.get("role")
        company = meta.get("company_id", "COMPANY")
        have = f" (your role: {role})" if role else ""
        return (
            f"your key may not do this in company {company}{have}; an instance admin grants "
            f"access with `paperclip keys create USER --member {company}:admin`"
        )
    if reason == "BOARD_REQUIRED":
        return "only a board key (for some calls, an instance admin's) may do this"
    if reason == "AGENT_NOT_INVOKABLE":
        return (
            "the agent is paused or terminated; resume a paused one with `paperclip agents resume`"
        )
    if reason == "WORKSPACE_CLOSE_BLOCKED":
        blocking = meta.get("blocking_reasons", "")
        return f"blocked by: {blocking}; see `paperclip workspaces readiness WORKSPACE`"
    if reason == "ENVIRONMENT_LEASE_HELD":
        return f"run {meta.get('run_id', '?')} holds the environment; wait or release its lease"
    if error.code.name == "ABORTED":
        return "someone changed it meanwhile: read it again and retry"
    if error.code.name == "NOT_FOUND":
        resource = reason.removesuffix("_NOT_FOUND")
        where = _LISTS.get(resource)
        return f"check the id ({where})" if where else "check the id"
    if error.code.name == "INVALID_ARGUMENT":
        return "fix the fields named above; `--help` lists each option"
    if error.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return (
            f"is the suite running at {connection.gateway}? start it with `make run`, or pass "
            "--gateway / PAPERCLIP_GATEWAY_ADDR; `paperclip status` shows which service is down"
        )
    return ""


def _checkout_conflict(meta: dict[str, str]) -> str:
    holder = meta.get("holder_run_id", "")
    if meta.get("conflict") == "status":
        return (
            f"the issue is {meta.get('status', '?')}, not in an expected status; pass "
            f"--expect {meta.get('status', 'STATUS')} if you mean it"
        )
    if meta.get("holder_live") == "true":
        return (
            f"run {holder} holds it and is live: wait (`paperclip runs watch {holder}`), "
            f"cancel it (`paperclip runs cancel {holder}`) or take the issue back "
            "(`paperclip issues force-release ISSUE`)"
        )
    assignee = meta.get("assignee_agent_id", "")
    held = f"held by finished run {holder}" if holder else f"assigned to agent {assignee}"
    return (
        f"{held}; the lock sweep frees a finished holder, or take it back now with "
        "`paperclip issues force-release ISSUE --clear-assignee`"
    )


def report_call_failure(error: PaperclipError, connection: Connection, output: Output) -> ExitCode:
    """Print a failed call; its exit code."""
    code = exit_code_for(error.code.name)
    hint = hint_for(error, connection)
    if output.as_json:
        body = {
            "code": error.code.name,
            "reason": error.reason,
            "message": error.message,
            "metadata": error.metadata,
            "violations": [
                {"field": v.field, "description": v.description} for v in error.violations
            ],
            "hint": hint,
            "exit_code": int(code),
        }
        _json_error(body)
        return code
    lines = [f"error: {error.reason}: {error.message}"]
    lines += [
        f"  {v.field}: {v.description}"
        for v in error.violations
        if error.message != f"{v.field}: {v.description}"
    ]
    details = {k: v for k, v in sorted(error.metadata.items()) if v}
    if details:
        lines.append("  " + ", ".join(f"{k}={v}" for k, v in details.items()))
    if hint:
        lines.append(f"hint: {hint}")
    sys.stderr.write("\n".join(lines) + "\n")
    return code


def report_cli_failure(failure: CliFailure, output: Output) -> ExitCode:
    """Print a failure found by the command itself; its exit code."""
    if output.as_json:
        _json_error(
            {"message": failure.message, "hint": failure.hint, "exit_code": int(failure.exit_code)}
        )
        return failure.exit_code
    sys.stderr.write(
        f"error: {failure.message}\n" + (f"hint: {failure.hint}\n" if failure.hint else "")
    )
    return failure.exit_code


def _json_error(body: dict[str, object]) -> None:
    sys.stderr.write(json.dumps({"error": body}, sort_keys=True) + "\n")


__all__ = ["hint_for", "report_call_failure", "report_cli_failure"]
