"""Runtime service processes: spawn one in its own session with its output appended to
a log file, know it by (pid, create time), and learn when it ends.

The output goes to a file the child holds itself, never to a pipe of ours: a service
adopted after the workspace service restarted keeps running, where a pipe to the dead
parent would kill it with SIGPIPE on its next write. The log is read back only for the
tail shown when a start fails or the service dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from supervision.process_tree import create_time_of, kill_tree, process_alive
from workspace_service.model import RuntimeServiceRecord

LOG_DIR = "workspace-service-logs"
#: Between SIGTERM and SIGKILL when a service's tree is stopped.
KILL_GRACE_S = 5.0
#: A log already this large when its service starts again is started afresh: a log
#: grows only while one process writes it, not across every restart.
MAX_LOG_BYTES_AT_START = 8 * 1024 * 1024
#: Bytes of the log quoted in an error ("| stderr: ...").
ERROR_TAIL_BYTES = 2048
#: Starts the line written to the log before each start.
_HEADER = "[paperclip] starting service"
#: How often the liveness of an adopted process (not our child) is checked.
ADOPTED_POLL_S = 1.0


class SpawnError(RuntimeError):
    """The shell could not be started (missing directory, permission...)."""


@dataclass(frozen=True)
class ServiceProcess:
    """A spawned service: its identity and the task that resolves with its return code
    (negative: killed by that signal)."""

    pid: int
    pgid: int
    create_time: float
    log_path: Path
    exited: asyncio.Task[int]


@dataclass(eq=False)
class Supervised:
    """A process a supervisor is responsible for: its child (``exited`` set) or one
    adopted after a restart (watched by polling)."""

    service_id: str
    name: str
    pid: int
    pgid: int
    create_time: float
    log_path: str | None
    exited: asyncio.Task[int] | None = None
    watcher: asyncio.Task[None] | None = None
    #: Set by whoever ends the process on purpose: its end is then theirs to record.
    stopping: bool = False

    async def stop(self, grace: float) -> None:
        """End the process tree on purpose (TERM, ``grace``, KILL) and its watcher."""
        self.stopping = True
        await kill_tree(self.pid, self.pgid, self.create_time, grace)
        if self.watcher is not None and self.watcher is not asyncio.current_task():
            self.watcher.cancel()
            await asyncio.gather(self.watcher, return_exceptions=True)

    async def wait_end(self) -> tuple[int | None, str]:
        """Wait until the process ends: its return code (None for an adopted process,
        whose exit status cannot be known) and what happened, for people."""
        if self.exited is None:
            await wait_gone(self.pid, self.create_time)
            return None, "exited while adopted after a restart; exit status unknown"
        code = await asyncio.shield(self.exited)  # the exit task also reaps the child
        return code, describe_exit(code)


def log_path_for(home: Path, service_id: str) -> Path:
    """Where the output of runtime service ``service_id`` is appended."""
    return home / LOG_DIR / f"{service_id}.log"


async def spawn_service(
    *, command: str, cwd: str, env: Mapping[str, str], log_path: Path
) -> ServiceProcess:
    """Start ``/bin/sh -c command`` in ``cwd`` with exactly ``env``, in a new session
    (so it leads its own process group), stdin from /dev/null, stdout and stderr
    appended to ``log_path``."""
    fd = _open_log(log_path)
    try:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.write(fd, f"{_HEADER} {stamp} in {cwd}: {command}\n".encode())
        # start_new_session, never preexec_fn: this process runs gRPC threads, and
        # Python code between fork and exec is unsafe with threads.
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            command,
            cwd=cwd,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
        )
    except OSError as exc:
        detail = exc.strerror or str(exc)
        raise SpawnError(f"could not start the command in {cwd}: {detail}") from exc
    finally:
        os.close(fd)  # the child has its own copy
    # Unreachable while unreaped; 0 would never match a live process.
    create_time = create_time_of(proc.pid, default=0.0)
    exited = asyncio.create_task(proc.wait(), name=f"service-exit-{proc.pid}")
    return ServiceProcess(proc.pid, proc.pid, create_time, log_path, exited)


async def wait_gone(pid: int, create_time: float) -> None:
    """Return once the process (pid, create time), not our child, has exited."""
    # Polled: only a parent can wait for a process, and ours is not its parent.
    while process_alive(pid, create_time):  # noqa: ASYNC110
        await asyncio.sleep(ADOPTED_POLL_S)


def _open_log(log_path: Path) -> int:
    """A descriptor appending to ``log_path`` (a log grown too large starts afresh)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if log_path.stat().st_size > MAX_LOG_BYTES_AT_START:
            log_path.unlink()
    return os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def log_tail(path: str | Path | None, limit: int = ERROR_TAIL_BYTES) -> str:
    """The last ``limit`` bytes a service wrote to its log since its latest start, as
    text ('' when there are none)."""
    if not path:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
    header = text.rfind(_HEADER)
    if header >= 0:  # what an earlier start wrote, and our own line, are not its output
        text = text[header:].partition("\n")[2]
    return text.strip()


async def kill_recorded_tree(row: RuntimeServiceRecord) -> None:
    """Stop the recorded process of ``row`` and what is left of its group (create time
    checked, so a reused pid is never signalled)."""
    if row.pid is not None and row.create_time is not None:
        await kill_tree(row.pid, row.pgid or row.pid, row.create_time, KILL_GRACE_S)


def exited_cleanly(code: int) -> bool:
    """Exit 0 or SIGTERM; 143 is how a shell that did not exec
    its command reports a SIGTERMed child."""
    return code in (0, -signal.SIGTERM, 128 + signal.SIGTERM)


def describe_exit(code: int) -> str:
    """``exited with code 3`` / ``was killed by SIGKILL`` for an asyncio return code."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name}"
