"""The process supervisor on real child processes (the agents in ``tests/agents``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from run_service.output import Stream
from run_service.supervisor import (
    Outcome,
    ProcessLimits,
    ProcessSpec,
    SpawnError,
    SupervisedProcess,
    spawn,
)
from supervision.process_tree import kill_tree, process_alive

AGENTS = Path(__file__).resolve().parent.parent / "agents"
MIB = 1024 * 1024
#: What a test agent needs from the environment (PATH for ``sleep``; LC_ALL keeps Python
#: from adding LC_CTYPE to the environment it was given, see PEP 538).
BASE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}


class Leftovers:
    """Everything a test started, killed at teardown even when the test failed."""

    def __init__(self) -> None:
        self.supervised: list[SupervisedProcess] = []
        self.pids: list[tuple[int, float]] = []

    def add_pid(self, pid: int) -> None:
        """Also kill ``pid`` (as it is now) at teardown."""
        with contextlib.suppress(psutil.NoSuchProcess):
            self.pids.append((pid, psutil.Process(pid).create_time()))

    async def kill_all(self) -> None:
        for process in self.supervised:
            await kill_tree(process.pid, process.pgid, process.create_time, grace=0.1)
            with contextlib.suppress(TimeoutError):  # still clean up the others
                await asyncio.wait_for(process.wait(), timeout=10)
        for pid, create_time in self.pids:
            await kill_tree(pid, pid, create_time, grace=0.1)


@pytest.fixture
async def leftovers() -> AsyncIterator[Leftovers]:
    tracked = Leftovers()
    yield tracked
    await tracked.kill_all()


class Collector:
    """An ``on_output`` callback that keeps the chunks it is given."""

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self.chunks: list[tuple[Stream, bytes, bool]] = []
        self.stored = 0
        self.largest = 0
        self.markers = 0
        self.first_line = asyncio.get_running_loop().create_future()

    async def __call__(self, stream: Stream, data: bytes, truncated: bool) -> None:
        self.stored += len(data)
        self.largest = max(self.largest, len(data))
        self.markers += truncated
        if self.keep:
            self.chunks.append((stream, data, truncated))
        if stream == "stdout" and b"\n" in data and not self.first_line.done():
            self.first_line.set_result(data.split(b"\n", 1)[0].decode())

    def text(self, stream: Stream) -> str:
        return b"".join(data for s, data, _ in self.chunks if s == stream).decode()


def agent(name: str, *args: str | float) -> list[str]:
    return [sys.executable, str(AGENTS / name), *map(str, args)]


async def start(
    leftovers: Leftovers,
    argv: list[str],
    *,
    on_output: Collector | None = None,
    env: dict[str, str] | None = None,
    limits: ProcessLimits | None = None,
) -> SupervisedProcess:
    spec = ProcessSpec(argv=argv, env=env or BASE_ENV, limits=limits or ProcessLimits())
    process = await spawn(spec, on_output=on_output)
    leftovers.supervised.append(process)
    return process


async def outcome_within(process: SupervisedProcess, seconds: float) -> Outcome:
    return await asyncio.wait_for(process.wait(), timeout=seconds)


async def gone_within(pids: list[int], seconds: float) -> list[int]:
    """The pids still running (not zombies) after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        alive = [pid for pid in pids if _running(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        await asyncio.sleep(0.05)


def unsupervised(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """A plain child the supervisor knows nothing of, like a process adopted after a restart
    (starting it blocks the loop for a moment, which a test can afford)."""
    return subprocess.Popen(argv, **kwargs)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def grandchild_pids(collector: Collector, leftovers: Leftovers) -> dict[str, int]:
    pids: dict[str, int] = json.loads(await asyncio.wait_for(collector.first_line, 10))
    for pid in pids.values():
        leftovers.add_pid(pid)
    return pids


async def test_successful_agent_exits_zero_with_its_output(leftovers: Leftovers) -> None:
    output = Collector()
    process = await start(leftovers, agent("succeed.py"), on_output=output)

    outcome = await outcome_within(process, 10)

    assert outcome.reason == "exited"
    assert (outcome.exit_code, outcome.signal) == (0, None)
    assert outcome.succeeded
    assert output.text("stdout") == "hello from succeed\n"
    assert outcome.stdout_bytes == len("hello from succeed\n")
    assert (outcome.stderr_bytes, outcome.truncated) == (0, False)


async def test_failing_agent_reports_its_exit_code(leftovers: Leftovers) -> None:
    output = Collector()
    process = await start(leftovers, agent("fail.py"), on_output=output)

    outcome = await outcome_within(process, 10)

    assert (outcome.reason, outcome.exit_code, outcome.signal) == ("exited", 3, None)
    assert not outcome.succeeded
    assert outcome.detail == "exited with status 3"
    assert output.text("stderr") == "failing on purpose\n"


async def test_spawn_records_identity_of_a_new_session_leader(leftovers: Leftovers) -> None:
    process = await start(leftovers, agent("sleep.py", 30, 0))

    assert process.pgid == process.pid == os.getpgid(process.pid) == os.getsid(process.pid)
    assert process.create_time == psutil.Process(process.pid).create_time()
    assert process_alive(process.pid, process.create_time)
    assert process.running

    await process.terminate("test over")
    assert not process_alive(process.pid, process.create_time)


async def test_sigkill_from_outside_is_reported_as_the_signal(leftovers: Leftovers) -> None:
    process = await start(leftovers, agent("sleep.py", 30, 0))

    os.kill(process.pid, signal.SIGKILL)
    outcome = await outcome_within(process, 5)

    # The child ended by itself as far as the supervisor knows; no negative exit code.
    assert (outcome.reason, outcome.exit_code, outcome.signal) == ("exited", None, "SIGKILL")
    assert outcome.detail == "killed by SIGKILL"


async def test_wall_clock_timeout_stops_the_agent(leftovers: Leftovers) -> None:
    began = time.monotonic()
    process = await start(
        leftovers,
        agent("sleep.py", 30, 0.2),
        limits=ProcessLimits(timeout_seconds=1, grace_seconds=1),
    )

    outcome = await outcome_within(process, 10)

    assert 0.9 < time.monotonic() - began < 4
    assert (outcome.reason, outcome.exit_code, outcome.signal) == ("timeout", None, "SIGTERM")
    assert outcome.detail == "timed out after 1 s"
    assert not process_alive(process.pid, process.create_time)


async def test_idle_timeout_kills_a_silent_agent_and_its_grandchildren(
    leftovers: Leftovers,
) -> None:
    output = Collector()
    began = time.monotonic()
    process = await start(
        leftovers,
        agent("grandchildren.py"),
        on_output=output,
        limits=ProcessLimits(idle_timeout_seconds=1),
    )
    pids = await grandchild_pids(output, leftovers)

    outcome = await outcome_within(process, 10)

    # Killed through the tree snapshot, not later by the drain guard (2 s after the exit).
    assert 0.9 < time.monotonic() - began < 2.5
    assert outcome.reason == "idle_timeout"
    assert await gone_within([process.pid, *pids.values()], 3) == []


async def test_agent_printing_regularly_is_not_idle_killed(leftovers: Leftovers) -> None:
    output = Collector()
    process = await start(
        leftovers,
        agent("sleep.py", 2, 0.2),
        on_output=output,
        limits=ProcessLimits(idle_timeout_seconds=1),
    )

    outcome = await outcome_within(process, 10)

    assert (outcome.reason, outcome.exit_code) == ("exited", 0)
    lines = output.text("stdout").splitlines()
    assert lines[:3] == ["progress 0", "progress 1", "progress 2"]  # in order
    assert lines[-1] == "done"


async def test_touch_keeps_a_silent_agent_from_idle_timeout(leftovers: Leftovers) -> None:
    process = await start(
        leftovers, agent("sleep.py", 2, 0), limits=ProcessLimits(idle_timeout_seconds=1)
    )

    async def report_activity() -> None:
        while process.running:
            process.touch()
            await asyncio.sleep(0.3)

    reporter = asyncio.create_task(report_activity())
    outcome = await outcome_within(process, 10)
    await reporter

    assert (outcome.reason, outcome.exit_code) == ("exited", 0)


async def test_agent_ignoring_sigterm_is_killed_after_grace(leftovers: Leftovers) -> None:
    output = Collector()
    process = await start(
        leftovers,
        agent("ignore_sigterm.py"),
        on_output=output,
        limits=ProcessLimits(grace_seconds=1),
    )
    assert await asyncio.wait_for(output.first_line, 10) == "ready"

    began = time.monotonic()
    outcome = await asyncio.wait_for(process.terminate("test"), timeout=10)

    assert 0.9 < time.monotonic() - began < 3
    assert (outcome.reason, outcome.exit_code, outcome.signal) == ("cancelled", None, "SIGKILL")
    assert outcome.detail == "cancelled: test"


async def test_terminate_kills_child_and_both_grandchildren(leftovers: Leftovers) -> None:
    output = Collector()
    process = await start(leftovers, agent("grandchildren.py"), on_output=output)
    pids = await grandchild_pids(output, leftovers)
    assert os.getsid(pids["new_session"]) == pids["new_session"]  # out of the group's reach
    assert os.getpgid(pids["same_group"]) == process.pgid

    began = time.monotonic()
    outcome = await asyncio.wait_for(process.terminate("test"), timeout=10)

    # Prompt: the grandchildren were in the snapshot, not left to the 2 s drain guard.
    assert time.monotonic() - began < 1.5
    assert (outcome.reason, outcome.signal) == ("cancelled", "SIGTERM")
    assert await gone_within([process.pid, *pids.values()], 3) == []


async def test_grandchildren_holding_pipes_do_not_delay_the_outcome_forever(
    leftovers: Leftovers,
) -> None:
    output = Collector()
    began = time.monotonic()
    process = await start(leftovers, agent("grandchildren.py", "exit"), on_output=output)
    pids = await grandchild_pids(output, leftovers)

    outcome = await outcome_within(process, 10)

    assert time.monotonic() - began < 5  # about the 2 s drain guard, not forever
    assert (outcome.reason, outcome.exit_code) == ("exited", 0)
    assert await gone_within(list(pids.values()), 3) == []


async def test_flood_is_counted_but_stored_only_up_to_the_cap(leftovers: Leftovers) -> None:
    output = Collector(keep=False)
    tracemalloc.start()
    try:
        began = time.monotonic()
        process = await start(
            leftovers,
            agent("flood.py", 10),
            on_output=output,
            limits=ProcessLimits(run_max_bytes=MIB),
        )
        outcome = await outcome_within(process, 20)
        elapsed = time.monotonic() - began
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert (outcome.reason, outcome.exit_code) == ("exited", 0)
    assert outcome.stdout_bytes == 10 * MIB
    assert outcome.truncated
    assert output.stored == MIB  # everything up to the cap, nothing after it
    assert output.markers == 1
    assert output.largest <= 64 * 1024
    assert peak < 4 * MIB  # never holds the whole output
    assert elapsed < 10  # drained at full speed, not blocked on a full pipe


async def test_agent_receives_exactly_the_given_environment(
    leftovers: Leftovers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAPERCLIP_SECRET_OF_THE_PARENT", "must-not-leak")
    env = {**BASE_ENV, "PAPERCLIP_RUN_ID": "run-1", "PAPERCLIP_AGENT_TOKEN": "t0k", "FOO": "bar"}
    output = Collector()
    process = await start(leftovers, agent("env_dump.py"), on_output=output, env=env)

    await outcome_within(process, 10)

    assert json.loads(output.text("stdout")) == env


@pytest.mark.parametrize(
    ("argv", "cwd"),
    [
        (["/nonexistent/agent-binary"], None),
        ([sys.executable, "-c", "pass"], "/nonexistent-dir"),
        (["{not_executable}"], None),
        ([], None),
    ],
    ids=["missing-program", "bad-cwd", "permission", "empty-argv"],
)
async def test_spawn_failure_raises_spawn_error_and_leaves_no_zombie(
    argv: list[str], cwd: str | None, tmp_path: Path
) -> None:
    not_executable = tmp_path / "agent.sh"
    not_executable.write_text("#!/bin/sh\nexit 0\n")
    not_executable.chmod(0o644)
    argv = [arg.format(not_executable=not_executable) for arg in argv]

    def zombies() -> list[int]:
        me = psutil.Process()
        return [p.pid for p in me.children() if _status(p) == psutil.STATUS_ZOMBIE]

    before = zombies()
    with pytest.raises(SpawnError, match="Failed to start command"):
        await spawn(ProcessSpec(argv=argv, env=BASE_ENV, cwd=cwd))
    assert set(zombies()) <= set(before)


def _status(proc: psutil.Process) -> str:
    try:
        return proc.status()
    except psutil.NoSuchProcess:
        return "gone"


async def test_kill_tree_refuses_a_pid_with_another_create_time(leftovers: Leftovers) -> None:
    sleeper = unsupervised(["sleep", "30"], start_new_session=True)
    try:
        leftovers.add_pid(sleeper.pid)
        real = psutil.Process(sleeper.pid).create_time()

        for wrong in (real - 1000, real + 1000):  # the pid was reused, as far as we know
            await kill_tree(sleeper.pid, sleeper.pid, wrong, grace=1)
            assert sleeper.poll() is None
            assert process_alive(sleeper.pid, real)
            assert not process_alive(sleeper.pid, wrong)

        await kill_tree(sleeper.pid, sleeper.pid, real, grace=1)
        assert sleeper.wait(timeout=5) == -signal.SIGTERM
    finally:
        sleeper.kill()
        sleeper.wait()


async def test_kill_tree_stops_an_adopted_tree_without_a_handle(leftovers: Leftovers) -> None:
    adopted = unsupervised(
        agent("grandchildren.py"), stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert adopted.stdout is not None
        pids = json.loads(adopted.stdout.readline())
        for pid in (adopted.pid, *pids.values()):
            leftovers.add_pid(pid)

        await kill_tree(adopted.pid, adopted.pid, psutil.Process(adopted.pid).create_time(), 1)

        assert adopted.wait(timeout=5) == -signal.SIGTERM
        assert await gone_within(list(pids.values()), 3) == []
    finally:
        adopted.kill()
        adopted.wait()
        if adopted.stdout is not None:
            adopted.stdout.close()


async def test_process_alive_is_false_after_exit_and_for_zombies() -> None:
    child = unsupervised(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        create_time = psutil.Process(child.pid).create_time()
        assert process_alive(child.pid, create_time)
        assert child.stdin is not None
        child.stdin.close()  # it exits; unreaped, it is a zombie
        await _until(lambda: _status(psutil.Process(child.pid)) == psutil.STATUS_ZOMBIE)
        assert not process_alive(child.pid, create_time)
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid, create_time)


async def _until(condition: Callable[[], bool], seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_terminate_after_exit_keeps_the_exit_outcome(leftovers: Leftovers) -> None:
    process = await start(leftovers, agent("succeed.py"))
    first = await outcome_within(process, 10)

    again = await asyncio.wait_for(process.terminate("late"), timeout=5)

    assert again == first
    assert again.reason == "exited"
