"""Loopback ports of runtime services: the reservation of a start, whether a port is
free, who holds one.

Which workspace gets a port is decided by the database reservation
(``runtime_services_port_idx``: one starting or running service per host and port),
written before the service spawns. The socket checks only say whether the operating
system would let a service bind the port now, and name the process in the way when it
would not.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable, Collection
from typing import TypeVar

import asyncpg
import psutil

from common.errors import FailedPrecondition
from supervision.process_tree import descendants, group_members
from workspace_service.commands import CommandDef
from workspace_service.runtime_store import is_port_conflict

LOOPBACK = "127.0.0.1"
PORT_IN_USE = "RUNTIME_PORT_IN_USE"
#: Ports tried by an ``auto_port`` start that keeps losing its pick to other workspaces.
PORT_ATTEMPTS = 20

T = TypeVar("T")


def port_is_free(port: int) -> bool:
    """Whether a TCP listener could bind ``127.0.0.1:port`` now.

    SO_REUSEADDR as every server sets it: connections of an earlier listener still in
    TIME_WAIT do not make a port busy, a listener on it (any address) does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port(*, excluding: Collection[int] = ()) -> int:
    """A loopback port the kernel hands out as free now (bind to port 0), not one of
    ``excluding``."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port: int = sock.getsockname()[1]
        if port not in excluding:
            return port


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on TCP ``port``, when psutil can tell (the
    processes of other users show no pid)."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return None
    for conn in connections:
        if conn.status != psutil.CONN_LISTEN or not conn.laddr:
            continue
        if conn.laddr.port == port and conn.pid is not None:
            return conn.pid
    return None


def held_outside_tree(port: int, pid: int, pgid: int, create_time: float) -> int | None:
    """The pid listening on ``port`` if it is not the process (pid, create time), one of
    its descendants or a member of its group ``pgid``; None when the tree holds the port
    or nobody visible does. Tells an adopted service from a stranger on its old port."""
    holder = listener_pid(port)
    if holder is None or holder == pid:
        return None
    tree = {p.pid for p in group_members(pgid, create_time)}
    with contextlib.suppress(psutil.Error):
        tree.update(p.pid for p in descendants(psutil.Process(pid)))
    return None if holder in tree else holder


async def reserve_port(
    command: CommandDef, *, previous: int | None, write: Callable[[int | None], Awaitable[T]]
) -> T:
    """Reserve the port of a start by ``write(port)`` (which raises the database's port
    conflict when a live service of this host holds that port), and return its result.

    No port wanted: ``write(None)``. An explicit port: refused (``RUNTIME_PORT_IN_USE``)
    when something listens on it or the database reserves it. ``auto_port``: the
    ``previous`` port if free, else a free one; a port another workspace
    reserved first is dropped and another picked, a bounded number of times.
    """
    if not command.wants_port:
        return await write(None)
    if command.port > 0:
        if not port_is_free(command.port):
            raise port_in_use(command.port, listener_pid(command.port))
        try:
            return await write(command.port)
        except asyncpg.UniqueViolationError as exc:
            if is_port_conflict(exc):
                raise port_in_use(command.port, listener_pid(command.port)) from exc
            raise
    taken: set[int] = set()
    for _ in range(PORT_ATTEMPTS):
        if previous and previous not in taken and port_is_free(previous):
            port = previous
        else:
            port = free_port(excluding=taken)
        try:
            return await write(port)
        except asyncpg.UniqueViolationError as exc:
            if not is_port_conflict(exc):
                raise
            taken.add(port)
    raise FailedPrecondition(
        f"no free port for {command.name} after {PORT_ATTEMPTS} attempts", reason=PORT_IN_USE
    )


def port_in_use(port: int, pid: int | None = None) -> FailedPrecondition:
    """The error of a start refused because ``port`` is taken (by ``pid`` if known)."""
    holder = f" by pid {pid}" if pid else ""
    metadata = {"port": str(port)}
    if pid:
        metadata["pid"] = str(pid)
    return FailedPrecondition(
        f"port {port} is already in use{holder}", reason=PORT_IN_USE, metadata=metadata
    )
