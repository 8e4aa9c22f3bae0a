"""Git for test setups and checks: a hermetic configuration, commands, commits."""

from __future__ import annotations

import subprocess
from pathlib import Path


def run_git(cwd: Path | str, *args: str) -> str:
    """Run git for a test's setup or check; its stdout, stripped."""
    identity = ("-c", "user.name=Paperclip Test", "-c", "user.email=test@paperclip.invalid")
    done = subprocess.run(
        ["git", *identity, *args], cwd=cwd, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def write(path: Path | str, content: str = "x\n") -> None:
    """Write ``content`` to ``path``, making its directory."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(content)


def commit(cwd: Path | str, name: str) -> str:
    """Commit a new file ``name``; the new HEAD."""
    write(Path(cwd, name), f"{name}\n")
    run_git(cwd, "add", name)
    run_git(cwd, "commit", "-q", "-m", f"add {name}")
    return run_git(cwd, "rev-parse", "HEAD")


def new_repo(parent: Path | str, branch: str = "main") -> Path:
    """A repository under ``parent`` with one commit on ``branch``."""
    root = Path(parent, "repo")
    run_git(parent, "init", "-q", "-b", branch, str(root))
    commit(root, "README.md")
    return root
