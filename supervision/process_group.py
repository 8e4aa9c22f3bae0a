"""The launcher's child processes: spawn, wait until ready, stop.

Each child runs ``python -m <module>`` in its own process group (a Ctrl-C at the terminal
reaches only the launcher, which then stops the children in order) and with a
parent-death signal, so no child outlives the launcher however it ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PARENT_PID_ENV = "PAPERCLIP_PARENT_PID"
_POLL_S = 0.05


class ChildFailedError(RuntimeError):
    """A child exited, or never became ready, while it was expected to serve."""


class StartInterruptedError(RuntimeError):
    """A stop was requested while a child was starting."""


@dataclass(frozen=True)
class ProcessSpec:
    """A service process: the module run with ``python -m`` and its address variable."""

    module: str
    addr_env: str


@dataclass
class Child:
    """A spawned service process and the address it announced."""

    spec: ProcessSpec
    process: subprocess.Popen[bytes]
    ready_file: Path
    addr: str = ""


def spawn(spec: ProcessSpec, env: Mapping[str, str], ready_file: Path) -> Child:
    """Start ``python -m spec.module`` with ``env``; it announces itself in ``ready_file``."""
    ready_file.unlink(missing_ok=True)  # a file left by an earlier run is not a signal
    process = subprocess.Popen(
        [sys.executable, "-m", spec.module],
        env={
            **env,
            "PAPERCLIP_READY_FILE": str(ready_file),
            # The child arranges to die with us itself (die_with_parent): no Python code
            # runs between fork and exec, which is unsafe in a process with threads.
            PARENT_PID_ENV: str(os.getpid()),
            # Services fork agents and runtime services while their gRPC threads run;
            # gRPC's own fork handlers (for children that keep using gRPC, which ours
            # never do) are unsafe there.
            "GRPC_ENABLE_FORK_SUPPORT": env.get("GRPC_ENABLE_FORK_SUPPORT", "false"),
        },
        process_group=0,
    )
    logger.info("started", extra={"child": spec.module, "pid": process.pid})
    return Child(spec, process, ready_file)


def wait_ready(child: Child, *, timeout: float, stop_requested: Callable[[], bool]) -> str:
    """Wait until ``child`` writes its ready file; return the address it serves on."""
    deadline = time.monotonic() + timeout
    while not child.ready_file.exists():
        if child.process.poll() is not None:
            raise ChildFailedError(
                f"{child.spec.module} {describe_exit(child.process.returncode)} before it was "
                "ready (its log is above)"
            )
        if stop_requested():
            raise StartInterruptedError(f"stop requested while {child.spec.module} was starting")
        if time.monotonic() > deadline:
            raise ChildFailedError(
                f"{child.spec.module} did not become ready within {timeout:.0f} s "
                f"(no {child.ready_file})"
            )
        time.sleep(_POLL_S)
    child.addr = str(json.loads(child.ready_file.read_text())["addr"])
    return child.addr


def first_exited(children: Sequence[Child]) -> Child | None:
    """The first child that has exited, if any."""
    return next((c for c in children if c.process.poll() is not None), None)


def stop_all(children: Sequence[Child], *, grace: float) -> None:
    """SIGTERM every child (last started first), SIGKILL the group of any still running
    after ``grace`` seconds, and reap them all."""
    for child in reversed(children):
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in reversed(children):
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("killing", extra={"child": child.spec.module, "grace_s": grace})
            # Not reaped yet, so the pid (and the group it leads) is still this child's.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait()
        logger.info(
            "stopped",
            extra={"child": child.spec.module, "exit": describe_exit(child.process.returncode)},
        )
        child.ready_file.unlink(missing_ok=True)


def describe_exit(returncode: int | None) -> str:
    """``exited with status 3`` / ``was killed by SIGKILL`` / ``is running``."""
    if returncode is None:
        return "is running"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def die_with_parent(env: Mapping[str, str] | None = None) -> None:
    """In a service the launcher started: have the kernel SIGTERM this process when the
    launcher dies (PR_SET_PDEATHSIG), and stop at once if it already has."""
    raw = (os.environ if env is None else env).get(PARENT_PID_ENV)
    if not raw:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != int(raw):  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
