"""Supervised agent processes: spawn, stream output, enforce limits, kill the whole tree.

An agent starts in its own session, so it leads a new process group (pgid == pid) that a
Ctrl-C or a signal to the run service never reaches by accident, and that can be stopped
as a whole. Its pid, group and create time are known the moment :func:`spawn` returns,
so the caller can persist them before the run counts as started.

The child's exit is an event delivered by asyncio's child watcher, not a poll:
:meth:`SupervisedProcess.wait` resolves as soon as the child has exited and its pipes have
drained. No database here; the caller persists identity, output and outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from run_service.output import OutputCallback, OutputSink, Stream, pump
from supervision.process_tree import (
    create_time_of,
    group_members,
    kill_tree,
    pipe_holders,
    process_alive,
    stop_processes,
)

__all__ = [
    "DRAIN_TIMEOUT_S",
    "Outcome",
    "OutputCallback",
    "ProcessLimits",
    "ProcessSpec",
    "SpawnError",
    "StopReason",
    "Stream",
    "SupervisedProcess",
    "kill_tree",
    "process_alive",
    "spawn",
]

logger = logging.getLogger(__name__)

#: After the child exits, how long its pipes may stay open (a grandchild inherited them)
#: before the holders are stopped; and again, after that, before we close our read ends.
DRAIN_TIMEOUT_S = 2.0

StopReason = Literal["exited", "timeout", "idle_timeout", "cancelled"]


class SpawnError(RuntimeError):
    """The agent process could not be started (missing program, bad cwd, permission...)."""


@dataclass(frozen=True)
class ProcessLimits:
    """Per-agent limits; a timeout of 0 means none."""

    timeout_seconds: float = 0.0
    idle_timeout_seconds: float = 0.0
    grace_seconds: float = 15.0
    chunk_max_bytes: int = 64 * 1024
    run_max_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.timeout_seconds < 0 or self.idle_timeout_seconds < 0:
            raise ValueError("timeouts must be >= 0 (0 = none)")
        if self.grace_seconds < 1:
            raise ValueError("grace_seconds must be >= 1")
        if self.chunk_max_bytes < 1 or self.run_max_bytes < 0:
            raise ValueError("chunk_max_bytes must be >= 1 and run_max_bytes >= 0")


@dataclass(frozen=True)
class ProcessSpec:
    """What to run. ``env`` is the child's *entire* environment (nothing is inherited);
    ``argv[0]`` is looked up on that environment's ``PATH``."""

    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str | None = None
    limits: ProcessLimits = field(default_factory=ProcessLimits)

    def __post_init__(self) -> None:
        if isinstance(self.argv, str):
            raise TypeError("argv is a sequence of arguments, not a command line")


@dataclass(frozen=True)
class Outcome:
    """How a supervised process ended.

    A child ended by a signal has ``exit_code`` None and ``signal`` set (``"SIGKILL"``);
    asyncio's negative return codes are never exposed. ``reason`` says who ended it: the
    child itself (``exited``, which includes a signal from outside the supervisor) or the
    supervisor, whatever the child's last status.
    """

    reason: StopReason
    exit_code: int | None
    signal: str | None
    stdout_bytes: int
    stderr_bytes: int
    truncated: bool
    detail: str  # for humans: "exited with status 3", "timed out after 30 s", ...

    @property
    def succeeded(self) -> bool:
        """Exited by itself with status 0."""
        return self.reason == "exited" and self.exit_code == 0


class _ExitAwareProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """The stream protocol of ``create_subprocess_exec``, plus an event set on child exit.

    ``Process.wait()`` also waits for the pipes to close, which a grandchild holding them
    open delays forever; this event fires when the child itself has exited.
    """

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited = asyncio.Event()

    def process_exited(self) -> None:
        super().process_exited()
        self.exited.set()


async def spawn(spec: ProcessSpec, *, on_output: OutputCallback | None = None) -> SupervisedProcess:
    """Start ``spec`` in a new session and supervise it until it ends.

    ``on_output(stream, data, truncated)`` receives the output (see
    :mod:`run_service.output`); it must not await :meth:`SupervisedProcess.wait` or
    :meth:`~SupervisedProcess.terminate` itself (the outcome waits for the output to be
    delivered): schedule them in a task instead.
    Raises :class:`SpawnError` if the program cannot be started; no process is left.
    """
    if not spec.argv:
        raise SpawnError("Failed to start command: empty argv")
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.subprocess_exec(
            lambda: _ExitAwareProtocol(spec.limits.chunk_max_bytes, loop),
            *spec.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=spec.cwd,
            env=dict(spec.env),
            start_new_session=True,  # setsid(): new session and group, no terminal
        )
    except (OSError, ValueError) as exc:  # subprocess reaps a child whose exec failed
        cause = (isinstance(exc, OSError) and exc.strerror) or str(exc)
        if isinstance(exc, OSError) and exc.filename:
            cause += f": {exc.filename}"
        raise SpawnError(f"Failed to start command {spec.argv[0]!r}: {cause}") from exc
    process = SupervisedProcess(spec, transport, protocol, on_output)
    logger.info("agent process started", extra={"pid": process.pid, "program": spec.argv[0]})
    return process


class SupervisedProcess:
    """A running agent process; create it with :func:`spawn`."""

    def __init__(
        self,
        spec: ProcessSpec,
        transport: asyncio.SubprocessTransport,
        protocol: _ExitAwareProtocol,
        on_output: OutputCallback | None,
    ) -> None:
        self._spec = spec
        self._transport = transport
        self._protocol = protocol
        self._loop = asyncio.get_running_loop()
        #: The child's pid; it leads its own process group, so ``pgid == pid``.
        self.pid: int = transport.get_pid()
        self.pgid: int = self.pid
        #: psutil's create time of the child: (pid, create_time) identifies it for good.
        self.create_time: float = _spawned_create_time(self.pid)
        self._started = self._loop.time()
        self._last_activity = self._started
        self._stop: tuple[StopReason, str] | None = None
        self._killer: asyncio.Task[None] | None = None
        self._pipe_inodes = _pipe_inodes(transport)
        self._sink = OutputSink(
            on_output, max_bytes=spec.limits.run_max_bytes, on_activity=self.touch
        )
        self._task = asyncio.create_task(self._supervise(), name=f"supervise-{self.pid}")

    @property
    def running(self) -> bool:
        """Whether the child itself has not exited yet."""
        return not self._protocol.exited.is_set()

    def touch(self) -> None:
        """Report activity (``ReportRunActivity``): restarts the idle timer."""
        self._last_activity = self._loop.time()

    async def wait(self) -> Outcome:
        """The outcome, once the child has exited and its pipes have drained."""
        return await asyncio.shield(self._task)

    async def terminate(self, reason: str = "cancelled by control plane") -> Outcome:
        """Cancel: stop the whole tree (SIGTERM, grace, SIGKILL) and return the outcome.

        Idempotent. If the child has already exited, or a timeout is already stopping it,
        the outcome keeps that reason.
        """
        self._request_stop("cancelled", f"cancelled: {reason}")
        return await self.wait()

    def _request_stop(self, reason: StopReason, detail: str) -> None:
        if self._stop is not None or not self.running:
            return
        self._stop = (reason, detail)
        logger.info("stopping agent process", extra={"pid": self.pid, "reason": reason})
        grace = self._spec.limits.grace_seconds
        self._killer = asyncio.create_task(
            kill_tree(self.pid, self.pgid, self.create_time, grace), name=f"kill-{self.pid}"
        )

    async def _supervise(self) -> Outcome:
        chunk = self._spec.limits.chunk_max_bytes
        readers = [
            asyncio.create_task(pump(reader, stream, self._sink, chunk_bytes=chunk))
            for stream, reader in self._readers()
        ]
        watchdog = asyncio.create_task(self._watchdog())
        try:
            await self._protocol.exited.wait()
            watchdog.cancel()
            if self._killer is not None:
                try:
                    await self._killer  # the snapshot gets its SIGKILL even though we exited
                except Exception:
                    logger.exception("stopping the process tree failed", extra={"pid": self.pid})
            await self._drain(readers)
        finally:
            for task in (watchdog, self._killer, *readers):
                if task is not None:
                    task.cancel()
            self._transport.close()
        return self._outcome(self._transport.get_returncode())

    def _readers(self) -> list[tuple[Stream, asyncio.StreamReader]]:
        pairs: list[tuple[Stream, asyncio.StreamReader | None]] = [
            ("stdout", self._protocol.stdout),
            ("stderr", self._protocol.stderr),
        ]
        return [(stream, reader) for stream, reader in pairs if reader is not None]

    async def _watchdog(self) -> None:
        """Sleep until the wall-clock or idle deadline; stop the tree if it has passed."""
        limits = self._spec.limits
        wall = self._started + limits.timeout_seconds if limits.timeout_seconds else math.inf
        while True:
            idle = limits.idle_timeout_seconds
            deadline = min(wall, self._last_activity + idle if idle else math.inf)
            if deadline == math.inf:
                return
            now = self._loop.time()
            if now >= deadline:
                break
            await asyncio.sleep(deadline - now)  # activity meanwhile moves the deadline on
        if now >= wall:
            self._request_stop("timeout", f"timed out after {limits.timeout_seconds:g} s")
        else:
            self._request_stop(
                "idle_timeout", f"no output or activity for {limits.idle_timeout_seconds:g} s"
            )

    async def _drain(self, readers: list[asyncio.Task[None]]) -> None:
        """Read the pipes to EOF, then stop what the run left behind.

        Normally EOF follows the exit at once. If something still holds a pipe
        ``DRAIN_TIMEOUT_S`` later, it is stopped like the tree; if even then no EOF comes,
        our read ends are closed (readers finish with what they have).
        """
        _, pending = await asyncio.wait(readers, timeout=DRAIN_TIMEOUT_S)
        leftovers = group_members(self.pgid, self.create_time)
        if pending:
            leftovers += pipe_holders(self._pipe_inodes)
        if leftovers:
            logger.warning(
                "agent exited and left processes behind, stopping them",
                extra={"pid": self.pid, "pids": [p.pid for p in leftovers]},
            )
            await stop_processes(
                leftovers,
                pgid=self.pgid,
                leader_create_time=self.create_time,
                group_signal=False,  # the leader is reaped: member by member, identity checked
                grace=self._spec.limits.grace_seconds,
            )
        if pending:
            _, pending = await asyncio.wait(pending, timeout=DRAIN_TIMEOUT_S)
        if pending:
            logger.warning("agent pipes still open, closing them", extra={"pid": self.pid})
            self._transport.close()  # EOF for our readers
        for result in await asyncio.gather(*readers, return_exceptions=True):
            if isinstance(result, BaseException):
                logger.error("reading agent output failed", exc_info=result)

    def _outcome(self, returncode: int | None) -> Outcome:
        exit_code, sig = _split_returncode(returncode)
        reason, detail = self._stop or ("exited", _describe(exit_code, sig))
        return Outcome(
            reason=reason,
            exit_code=exit_code,
            signal=sig,
            stdout_bytes=self._sink.counts["stdout"],
            stderr_bytes=self._sink.counts["stderr"],
            truncated=self._sink.truncated,
            detail=detail,
        )


def _spawned_create_time(pid: int) -> float:
    # Already exited and reaped (a very short program): it is not running, so no later
    # identity check can match it; the spawn time stands in.
    return create_time_of(pid, default=time.time())


def _pipe_inodes(transport: asyncio.SubprocessTransport) -> list[int]:
    """The inodes of the child's stdout/stderr pipes (to find who else holds them)."""
    inodes = []
    for fd in (1, 2):
        pipe_transport = transport.get_pipe_transport(fd)
        pipe = pipe_transport.get_extra_info("pipe") if pipe_transport is not None else None
        if pipe is not None:
            with contextlib.suppress(OSError, ValueError):
                inodes.append(os.fstat(pipe.fileno()).st_ino)
    return inodes


def _split_returncode(returncode: int | None) -> tuple[int | None, str | None]:
    """asyncio's returncode (negative: killed by that signal) as (exit code, signal name)."""
    if returncode is None or returncode >= 0:
        return returncode, None
    try:
        return None, signal.Signals(-returncode).name
    except ValueError:
        return None, f"SIG{-returncode}"


def _describe(exit_code: int | None, sig: str | None) -> str:
    return f"killed by {sig}" if sig else f"exited with status {exit_code}"
