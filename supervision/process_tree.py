"""Process trees seen through psutil: identity, liveness, and the TERM / grace / KILL stop.

Everything here works on pids, so it applies equally to a child this process supervises
and to one adopted after a restart, for which no asyncio handle exists. A process is
identified by its pid *and* its create time: a pid alone may have been reused by an
unrelated process since it was recorded, and such a process is never signalled.

Linux only (``/proc``), like the rest of the supervision (run and workspace services).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Collection, Iterable

import psutil

logger = logging.getLogger(__name__)

#: psutil's create time is the boot time (whole seconds from ``/proc/stat``, moved by
#: clock steps) plus the start time in clock ticks. A little slack keeps a stored value
#: matching after a restart; reusing a pid within a second of its first start would need
#: the whole pid space to wrap in that second.
CREATE_TIME_TOLERANCE_S = 1.0
#: How often a stop checks whether its targets are gone. Processes that are not our
#: children cannot be awaited, and a stop lasts at most ``grace`` seconds.
_POLL_S = 0.05
#: How long to wait for SIGKILLed processes to disappear before giving up on them.
_KILL_WAIT_S = 2.0


def create_time_of(pid: int, *, default: float) -> float:
    """The create time of process ``pid`` (just spawned), or ``default`` when it is
    already gone."""
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return default


def process_alive(pid: int, create_time: float) -> bool:
    """Whether ``pid`` is running and is the process created at ``create_time``.

    A zombie (exited, not yet reaped by its parent) counts as dead.
    """
    proc = _identified(pid, create_time)
    return proc is not None and is_alive(proc)


def is_alive(proc: psutil.Process) -> bool:
    """Whether ``proc`` (identity checked by psutil) still runs; zombies are dead."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # it exists; erring towards "alive" only makes a stop wait longer


async def kill_tree(pid: int, pgid: int, create_time: float, grace: float) -> None:
    """Stop the process tree of a run: SIGTERM, up to ``grace`` seconds, then SIGKILL.

    Targets the leader ``pid`` (only if its create time matches ``create_time``), its
    descendants found by psutil, and the members of its process group ``pgid``. The
    descendants are listed *before* any signal: once a parent dies its children are
    reparented and no longer appear under it. If the leader is gone, the members of its
    group are still stopped (orphans left behind by a dead run). If the pid now names a
    different process, its number was reused, so the old group is provably empty (Linux
    never reuses a number that is still a group id) and nothing is signalled.
    """
    leader = _identified(pid, create_time)
    targets: list[psutil.Process] = []
    if leader is not None and is_alive(leader):
        targets = [leader, *descendants(leader)]
    # killpg only while the verified leader (alive or an unreaped zombie) holds the group
    # number; otherwise the group is reached member by member, each identity checked.
    group_signal = leader is not None and pgid == pid
    group_pgid = pgid if pgid == pid else None
    await stop_processes(
        targets,
        pgid=group_pgid,
        leader_create_time=create_time,
        group_signal=group_signal,
        grace=grace,
    )


async def stop_processes(
    procs: Iterable[psutil.Process],
    *,
    pgid: int | None,
    leader_create_time: float,
    group_signal: bool,
    grace: float,
) -> None:
    """SIGTERM ``procs`` and the live members of group ``pgid``, wait up to ``grace``
    seconds for all of them to exit, then SIGKILL whatever is left (members that joined
    the group meanwhile included). ``group_signal`` also sends each signal with ``killpg``,
    which reaches members forked between our scan and the signal."""
    targets = _unique([*procs, *group_members(pgid, leader_create_time)])
    if not targets:
        return
    # SIGTERM first: agents may flush output and release what they hold.
    if group_signal and pgid is not None:
        _killpg(pgid, signal.SIGTERM)
    for proc in targets:
        if not (group_signal and _pgid_of(proc) == pgid):  # the killpg reached it already
            _signal(proc, signal.SIGTERM)
    if await _wait_gone(targets, grace):
        return
    # SIGKILL cannot be caught or ignored: the escalation that always ends the tree.
    survivors = _unique([p for p in targets if is_alive(p)])
    members = group_members(pgid, leader_create_time)
    survivors = _unique([*survivors, *members])
    logger.warning(
        "process tree survived SIGTERM, sending SIGKILL",
        extra={"pids": [p.pid for p in survivors], "grace_s": grace},
    )
    if group_signal and pgid is not None and members:
        _killpg(pgid, signal.SIGKILL)  # the group still has members, so it is still ours
    for proc in survivors:
        _signal(proc, signal.SIGKILL)
    if not await _wait_gone(survivors, _KILL_WAIT_S):
        logger.error("processes survived SIGKILL", extra={"pids": [p.pid for p in survivors]})


def descendants(proc: psutil.Process) -> list[psutil.Process]:
    """All living descendants of ``proc`` (by parent pid, recursively), now."""
    try:
        return [p for p in proc.children(recursive=True) if p.pid != os.getpid()]
    except psutil.Error:
        return []


def group_members(pgid: int | None, leader_create_time: float) -> list[psutil.Process]:
    """Live processes of the group ``pgid`` whose leader (pid ``pgid``) was created at
    ``leader_create_time``, whether or not that leader still exists.

    Empty when the pid ``pgid`` now names another process (the number was reused, so the
    original group has no member left), and never our own group.
    """
    if pgid is None or pgid <= 1 or pgid == os.getpgrp():
        return []
    try:
        os.killpg(pgid, 0)  # the fast path: no process at all in that group
    except ProcessLookupError:
        return []
    except PermissionError:
        pass  # some member exists; whether it is ours is checked one by one below
    holder = _process(pgid)
    if holder is not None and not _same_time(holder, leader_create_time):
        return []
    found = []
    for pid in psutil.pids():
        proc = _process(pid) if _pgid_of_pid(pid) == pgid and pid != os.getpid() else None
        # A member of the original group was created after its leader.
        if proc is not None and _created(proc) >= leader_create_time - CREATE_TIME_TOLERANCE_S:
            found.append(proc)
    return [p for p in found if is_alive(p)]


def pipe_holders(inodes: Collection[int]) -> list[psutil.Process]:
    """Processes other than this one that have one of the pipes ``inodes`` open.

    Finds a grandchild that left the process group (setsid) and so is out of reach of a
    group signal, but still holds the run's stdout or stderr open after the agent exited.
    """
    links = {f"pipe:[{inode}]" for inode in inodes}
    found = []
    for pid in psutil.pids():
        if pid != os.getpid() and _holds_any(pid, links):
            proc = _process(pid)
            if proc is not None:
                found.append(proc)
    return found


def _holds_any(pid: int, links: set[str]) -> bool:
    try:
        with os.scandir(f"/proc/{pid}/fd") as fds:
            for fd in fds:
                with contextlib.suppress(OSError):  # closed while we looked
                    if os.readlink(fd.path) in links:
                        return True
    except OSError:  # gone, or another user's process
        pass
    return False


def _identified(pid: int, create_time: float) -> psutil.Process | None:
    """The process ``pid`` if it was created at ``create_time`` (zombies included)."""
    if pid <= 1 or pid == os.getpid():
        return None
    proc = _process(pid)
    return proc if proc is not None and _same_time(proc, create_time) else None


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _created(proc: psutil.Process) -> float:
    try:
        return proc.create_time()
    except psutil.Error:
        return 0.0


def _same_time(proc: psutil.Process, create_time: float) -> bool:
    return abs(_created(proc) - create_time) <= CREATE_TIME_TOLERANCE_S


def _pgid_of(proc: psutil.Process) -> int | None:
    return _pgid_of_pid(proc.pid)


def _pgid_of_pid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _signal(proc: psutil.Process, sig: signal.Signals) -> None:
    """Signal ``proc`` unless it is gone or its pid now names another process."""
    if proc.pid == os.getpid():
        return
    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        if proc.is_running():  # re-checks the create time: never signal a reused pid
            proc.send_signal(sig)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    if pgid > 1 and pgid != os.getpgrp():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def _unique(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    return list({p.pid: p for p in procs}.values())


async def _wait_gone(procs: list[psutil.Process], seconds: float) -> bool:
    """Wait until none of ``procs`` is alive; False if some still are after ``seconds``."""
    deadline = time.monotonic() + seconds
    while any(is_alive(p) for p in procs):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL_S)
    return True


#: Where Linux names the current boot.
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str:
    """This host's boot id (a pid and start time are only unique within one boot)."""
    try:
        with open(BOOT_ID_FILE) as fh:
            return fh.read().strip()
    except OSError:
        return "unknown"
