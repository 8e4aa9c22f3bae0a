"""``paperclip runs watch`` streams a real agent's output through ``WatchRun`` as the
agent writes it: the lines arrive in order, spread over the run, the first one long
before the run ends."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import pytest

from tests.cli.conftest import Board, Cli, read_until

pytestmark = pytest.mark.e2e

AGENTS = Path(__file__).resolve().parents[1] / "agents"
#: The ticker agent prints COUNT lines, one every INTERVAL seconds, once told to go.
COUNT, INTERVAL = 8, 0.3
SPAN = (COUNT - 1) * INTERVAL


@pytest.fixture(scope="module")
def company(board: Board) -> dict[str, Any]:
    return board.company("CLI Watch Co")


def ticker(board: Board, company: dict[str, Any], name: str, go: Path) -> dict[str, Any]:
    return board.agent(
        company["id"], name, sys.executable, str(AGENTS / "ticker.py"), str(go), str(COUNT),
        str(INTERVAL),
    )  # fmt: skip


def timed(stream: IO[bytes]) -> list[tuple[float, str]]:
    """The rest of ``stream``, each line with the monotonic time it was read."""
    return [(time.monotonic(), raw.decode().rstrip("\n")) for raw in iter(stream.readline, b"")]


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    assert proc.stderr is not None
    code = proc.wait(timeout=30)
    return code, proc.stderr.read().decode()


def test_runs_watch_prints_each_line_as_the_agent_writes_it(
    cli: Cli, board: Board, company: dict[str, Any], tmp_path: Path
) -> None:
    go = tmp_path / "go"
    run_id = board.wake(ticker(board, company, "ticker", go)["id"])
    proc = cli.popen("runs", "watch", run_id)
    assert proc.stdout is not None and proc.stderr is not None
    read_until(proc.stderr, "* lifecycle: run started")
    go.touch()
    lines = timed(proc.stdout)
    ended = time.monotonic()
    code, stderr = finish(proc)

    assert code == 0, stderr
    assert [text for _, text in lines] == [f"tick {i}" for i in range(COUNT)]
    # Streamed, not collected at the end: the lines came over the run's whole span,
    # the first one long before the command ended, most of them a tick apart.
    arrivals = [at for at, _ in lines]
    assert arrivals[-1] - arrivals[0] >= SPAN * 0.7, lines
    assert ended - arrivals[0] >= SPAN * 0.7
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert sum(1 for gap in gaps if gap >= INTERVAL / 2) >= len(gaps) - 2, gaps
    assert f"* run {run_id} succeeded" in stderr


def test_wake_and_watch_as_json_lines(
    cli: Cli, board: Board, company: dict[str, Any], tmp_path: Path
) -> None:
    go = tmp_path / "go"
    agent = ticker(board, company, "json-ticker", go)
    proc = cli.popen("--json", "agents", "wake", agent["id"], "--watch")
    assert proc.stdout is not None
    started = json.loads(read_until(proc.stdout, "RUN_EVENT_TYPE_LIFECYCLE")[-1])
    go.touch()
    lines = timed(proc.stdout)
    code, stderr = finish(proc)

    assert code == 0, stderr
    events = [started, *(json.loads(text) for _, text in lines)]
    seqs = [int(e["seq"]) for e in events]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert events[-1]["type"] == "RUN_EVENT_TYPE_LIFECYCLE"
    assert events[-1]["payload"]["status"] == "succeeded"
    output = "".join(e["message"] for e in events if e["type"] == "RUN_EVENT_TYPE_STDOUT")
    assert output.splitlines() == [f"tick {i}" for i in range(COUNT)]
    assert lines[-1][0] - lines[0][0] >= SPAN * 0.7


def test_watching_a_failing_run_exits_7(cli: Cli, board: Board, company: dict[str, Any]) -> None:
    agent = board.agent(company["id"], "failing", sys.executable, str(AGENTS / "fail.py"))
    run_id = board.wake(agent["id"])
    watched = cli.run("runs", "watch", run_id)
    assert watched.code == 7
    assert "failing on purpose" in watched.stderr
    assert f"* run {run_id} failed (adapter_failed:" in watched.stderr
