"""The postmaster process of an embedded PostgreSQL server, seen from outside.

Recovery from a crash (stale lock files, orphaned server processes) and a stop that
escalates until nothing of the server is left. Everything here works on processes and
files only, so it applies equally to a server this process started and to one it adopts.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import time
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 30
_KILL_WAIT_S = 5


class OrphanedServerError(RuntimeError):
    """Processes of a crashed server still use the data directory."""


def remove_stale_lock_files(data_dir: Path) -> None:
    """Delete lock files left by a postmaster that died without cleaning up.

    The wheel trusts ``postmaster.pid`` when its pid merely exists, and postgres refuses
    to start while the pid of a lock file answers ``kill(pid, 0)``: both go wrong when the
    pid was reused, or is a zombie its new parent (init, in a container) has not reaped.
    """
    pid_file = data_dir / "postmaster.pid"
    lines = _read_lines(pid_file)
    if _is_postmaster_of(_first_int(lines), data_dir):
        logger.info("adopting running embedded postgres", extra={"pid": _first_int(lines)})
        return
    _wait_for_orphans(lines, data_dir)
    # Line 5 of postmaster.pid names the socket directory (the data dir, unless too long).
    socket_dir = Path(lines[4].strip()) if len(lines) > 4 and lines[4].strip() else data_dir
    stale = [pid_file] if lines else []
    stale += [
        lock
        for lock in socket_dir.glob(".s.PGSQL.*.lock")
        if not _is_live_postgres(_first_int(_read_lines(lock)))
    ]
    for path in stale:
        logger.warning("removing stale postgres lock file", extra={"path": str(path)})
        path.unlink(missing_ok=True)


def stop_postmaster(
    postmaster: psutil.Process | None, *, data_dir: Path, bin_dir: Path, system_user: str | None
) -> None:
    """Stop the server of ``data_dir``: ``pg_ctl stop -m fast``, then SIGQUIT and SIGKILL
    to the postmaster and its children if they survive it."""
    if postmaster is None or not is_alive(postmaster):
        return
    try:
        children = postmaster.children(recursive=True)
    except psutil.Error:
        children = []
    command = [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w"]
    command += ["-t", str(_STOP_TIMEOUT_S), "stop"]
    try:
        subprocess.run(
            command,
            check=False,  # a server that is already gone is fine; survivors are killed below
            user=system_user,
            capture_output=True,
            timeout=_STOP_TIMEOUT_S + 5,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("pg_ctl stop failed", extra={"error": repr(exc)})
    _kill_survivors([postmaster, *children])


def is_alive(process: psutil.Process) -> bool:
    """Running and not a zombie: a stopped postmaster is not our child, and its new
    parent (init in a container) may take a while to reap it."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _is_live_postgres(pid: int | None) -> bool:
    """True when ``pid`` is a running (not zombie) process named ``postgres``."""
    if pid is None:
        return False
    try:
        process = psutil.Process(pid)
        return is_alive(process) and process.name() == "postgres"
    except psutil.NoSuchProcess:
        return False


def _is_postmaster_of(pid: int | None, data_dir: Path) -> bool:
    """True unless ``pid`` is certainly not the postmaster serving ``data_dir``."""
    if not _is_live_postgres(pid):
        return False
    try:
        return str(data_dir) in psutil.Process(pid).cmdline()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # cannot tell: keep the file, postgres itself will judge it


def _wait_for_orphans(pid_file_lines: list[str], data_dir: Path) -> None:
    """Refuse to start while processes of a dead postmaster still use its shared memory
    (why postgres keeps the segment id on line 7 of ``postmaster.pid``)."""
    deadline = time.monotonic() + _KILL_WAIT_S
    while (attached := _shm_attached(pid_file_lines)) > 0:
        if time.monotonic() > deadline:
            raise OrphanedServerError(
                f"{attached} process(es) of a crashed PostgreSQL server still use {data_dir} "
                "(see `ps -u embedded_postgres` when running as root, else postgres "
                "processes of your user). Wait for them to exit or kill them, then retry."
            )
        time.sleep(0.1)


def _shm_attached(pid_file_lines: list[str]) -> int:
    """Processes attached to the SysV segment named in ``postmaster.pid`` (0 if gone)."""
    fields = pid_file_lines[6].split() if len(pid_file_lines) > 6 else []
    table = _read_lines(Path("/proc/sysvipc/shm"))
    if len(fields) != 2 or not table:
        return 0
    header = table[0].split()
    for row in table[1:]:
        values = dict(zip(header, row.split(), strict=False))
        if values.get("shmid") == fields[1]:
            return int(values.get("nattch", "0"))
    return 0


def _kill_survivors(processes: list[psutil.Process]) -> None:
    survivors = [p for p in processes if is_alive(p)]
    if not survivors:
        return
    logger.warning("embedded postgres did not stop; killing it", extra={"pids": len(survivors)})
    # SIGQUIT is postgres' immediate shutdown; SIGKILL if even that is ignored.
    for sig in (signal.SIGQUIT, signal.SIGKILL):
        for process in survivors:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(sig)
        deadline = time.monotonic() + _KILL_WAIT_S
        while survivors and time.monotonic() < deadline:
            time.sleep(0.05)
            survivors = [p for p in survivors if is_alive(p)]
        if not survivors:
            return


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def _first_int(lines: list[str]) -> int | None:
    first = lines[0].strip() if lines else ""
    return int(first) if first.isdigit() else None
