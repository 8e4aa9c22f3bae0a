"""Running git for workspaces: an unrecorded runner for read-only inspection, the
recorded form for commands that change a repository, and the few queries the
worktree, cleanup and close-readiness code share.

Git never prompts here (``GIT_TERMINAL_PROMPT=0``, no stdin) and runs with the
sanitized service environment, so Paperclip's secrets never reach hooks or credential
helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
from collections.abc import Mapping
from dataclasses import dataclass

from workspace_service.environment import sanitized_env
from workspace_service.recorder import Operation, Recorder

#: Variables that point git at a repository other than the one in ``cwd``. Inherited
#: from, say, a git hook that started the service, they would make every command below
#: act on that repository instead.
_LOCATING_VARIABLES = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_COMMON_DIR",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_NAMESPACE",
)
#: Seconds a recorded command that touches the network (fetch) may take.
NETWORK_TIMEOUT = 300.0
#: Seconds any other recorded git command may take.
LOCAL_TIMEOUT = 120.0


@dataclass(frozen=True)
class GitResult:
    """How one unrecorded git command ended."""

    code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        """Whether git exited 0."""
        return self.code == 0

    @property
    def out(self) -> str:
        """``stdout`` without its surrounding whitespace."""
        return self.stdout.strip()


@dataclass(frozen=True)
class WorktreeEntry:
    """One entry of ``git worktree list --porcelain``."""

    path: str
    head: str | None
    #: The short branch name; None when detached or bare.
    branch: str | None
    bare: bool = False
    detached: bool = False
    #: Git's reason when the entry's directory is gone; None while it is usable.
    prunable: str | None = None


def git_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every git command runs with: sanitized, never interactive."""
    env = {k: v for k, v in sanitized_env().items() if k not in _LOCATING_VARIABLES}
    env["GIT_TERMINAL_PROMPT"] = "0"
    env.update(extra or {})
    return env


async def git(
    *args: str,
    cwd: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,  # noqa: ASYNC109 - git's process group must be killed on expiry
) -> GitResult:
    """Run ``git *args`` in ``cwd`` unrecorded (for read-only inspection), with ``env``
    as its whole environment (default ``git_env()``).

    Never raises for a git failure: a missing ``cwd`` or git binary gives code 127, a
    timeout stops git's whole process group and gives its (negative) exit status.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            "git",
            *args,
            cwd=cwd,
            env=dict(env) if env is not None else git_env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # Its own group, so a timeout or a cancellation stops hooks and helpers too.
            start_new_session=True,
        )
    except OSError as exc:
        return GitResult(127, "", f"could not run git in {cwd}: {exc.strerror or exc}")
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        _kill_group(proc.pid)
        await proc.wait()
        message = f"{shlex.join(['git', *args])} timed out after {timeout:g} s"
        return GitResult(proc.returncode or -signal.SIGKILL, "", message)
    except asyncio.CancelledError:
        _kill_group(proc.pid)
        raise
    return GitResult(
        proc.returncode if proc.returncode is not None else -1,
        stdout.decode("utf-8", errors="replace"),
        stderr.decode("utf-8", errors="replace"),
    )


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def recorded_git(
    recorder: Recorder,
    phase: str,
    *args: str,
    cwd: str,
    step: str,
    metadata: Mapping[str, str] | None = None,
    timeout: float = LOCAL_TIMEOUT,  # noqa: ASYNC109 - the recorder stops the command itself
) -> Operation:
    """Run ``git *args`` in ``cwd`` as one recorded operation (``metadata.step`` names
    what it does) and return it; a failure is recorded, not raised."""
    return await recorder.run_command(
        phase,
        shlex.join(["git", *args]),
        cwd=cwd,
        env=git_env(),
        timeout=timeout,
        metadata={"step": step, **(metadata or {})},
    )


def failure_detail(op: Operation) -> str:
    """The last error line of a failed recorded command's stderr, for a message."""
    lines = [line.strip() for line in op.stderr.excerpt().splitlines() if line.strip()]
    # Git prints hints after its error line; the error is what explains the failure.
    errors = [line for line in lines if line.startswith(("fatal: ", "error: "))]
    if not errors and not lines:
        return f"exit code {op.exit_code}"
    return (errors or lines)[-1].removeprefix("fatal: ").removeprefix("error: ")


async def git_toplevel(path: str) -> str | None:
    """The top-level directory of the working tree holding ``path``, or None."""
    result = await git("rev-parse", "--show-toplevel", cwd=path)
    return result.out if result.ok and result.out else None


async def repository_root(path: str) -> str | None:
    """The owner repository's working tree for ``path`` (which may be inside one of
    its linked worktrees), or None when ``path`` is not in a git repository."""
    result = await git("rev-parse", "--path-format=absolute", "--git-common-dir", cwd=path)
    if not result.ok or not result.out:
        return None
    common = result.out
    if os.path.basename(common) == ".git":
        return os.path.dirname(common)
    # A separate git dir or a bare repository: the first entry is the main worktree.
    entries = await worktree_list(common)
    return entries[0].path if entries else common


async def branch_exists(repo: str, branch: str) -> bool:
    """Whether ``refs/heads/<branch>`` exists in ``repo``."""
    result = await git("show-ref", "--verify", "--quiet", f"refs/heads/{branch}", cwd=repo)
    return result.ok


async def resolves(repo: str, ref: str) -> bool:
    """Whether ``ref`` names a commit in ``repo``."""
    result = await git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", cwd=repo)
    return result.ok


async def current_branch(path: str) -> str | None:
    """The branch checked out at ``path``; None when detached or not a checkout."""
    result = await git("symbolic-ref", "--short", "-q", "HEAD", cwd=path)
    return result.out if result.ok and result.out else None


async def commits_between(repo: str, since: str, until: str) -> int | None:
    """How many commits ``until`` has that ``since`` lacks; None if either is unknown."""
    result = await git("rev-list", "--count", f"{since}..{until}", cwd=repo)
    return int(result.out) if result.ok and result.out.isdigit() else None


async def remotes(repo: str) -> list[str]:
    """The names of ``repo``'s remotes."""
    result = await git("remote", cwd=repo)
    return result.out.split() if result.ok else []


async def worktree_list(repo: str) -> list[WorktreeEntry]:
    """The worktrees registered in ``repo``, the main one first."""
    result = await git("worktree", "list", "--porcelain", cwd=repo)
    return parse_worktree_list(result.stdout) if result.ok else []


def parse_worktree_list(porcelain: str) -> list[WorktreeEntry]:
    """Entries of ``git worktree list --porcelain`` output (blank-line separated)."""
    entries: list[WorktreeEntry] = []
    for block in porcelain.strip().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, _, value = line.partition(" ")
            fields[key] = value
        if "worktree" not in fields:
            continue
        branch = fields.get("branch")
        entries.append(
            WorktreeEntry(
                path=fields["worktree"],
                head=fields.get("HEAD"),
                branch=branch.removeprefix("refs/heads/") if branch else None,
                bare="bare" in fields,
                detached="detached" in fields,
                prunable=(fields["prunable"] or "prunable") if "prunable" in fields else None,
            )
        )
    return entries


async def path_exists(path: str) -> bool:
    """Whether anything (a dangling symlink included) is at ``path``."""
    # Off the event loop: workspaces may live on network mounts, where a stat can hang.
    return await asyncio.to_thread(os.path.lexists, path)


async def is_directory(path: str) -> bool:
    """Whether ``path`` is a directory (or a symlink to one)."""
    return await asyncio.to_thread(os.path.isdir, path)


def same_path(a: str, b: str) -> bool:
    """Whether two paths name the same place once symlinks are resolved."""
    return os.path.realpath(a) == os.path.realpath(b)


def is_within(path: str, parent: str) -> bool:
    """Whether ``path`` is ``parent`` or below it, once symlinks are resolved."""
    real, base = os.path.realpath(path), os.path.realpath(parent)
    return os.path.commonpath([real, base]) == base
