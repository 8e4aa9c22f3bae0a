"""``make run`` survives the death of its embedded PostgreSQL (issue 11, "Database
outages"): the launcher and every service keep running, calls meanwhile answer
UNAVAILABLE with reason ``DATABASE_UNAVAILABLE`` (never INTERNAL or UNKNOWN), the
launcher starts PostgreSQL again on the same data directory, and the suite serves again
within 5 s of its return, with nothing restarted by hand."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from paperclip_client import PaperclipClient

from common.errors import PaperclipError
from paperclip.issues.v1 import issues_pb2
from tests.e2e.test_operator_flow import Launcher, _descendants, _free_port

pytestmark = pytest.mark.e2e

#: From the kill to PostgreSQL serving again, at most (it restarts within seconds).
BACK_WITHIN_S = 60.0
#: From PostgreSQL's return to the suite serving again, at most.
SERVES_WITHIN_S = 5.0


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    home = tmp_path / "home"
    home.mkdir()
    running = Launcher(home, f"127.0.0.1:{_free_port()}", tmp_path / "launcher.log")
    try:
        running.wait_ready()
        yield running
    finally:
        running.kill()


def _postmaster(launcher: Launcher) -> psutil.Process | None:
    """The postmaster of the launcher's data directory (its other processes are its
    children)."""
    found = launcher.postgres()
    pids = {p.pid for p in found}
    for proc in found:
        with contextlib.suppress(psutil.Error):
            if proc.ppid() not in pids:
                return proc
    return None


async def test_the_suite_serves_again_after_its_postgres_is_killed(launcher: Launcher) -> None:
    token = (launcher.home / "board-token").read_text().strip()
    services = {p.pid for p in _descendants(launcher.proc.pid) if p.name() != "postgres"}
    async with PaperclipClient(launcher.gateway, token) as client:
        company = await client.issues.CreateCompany(issues_pb2.CreateCompanyRequest(name="Pre"))
        old = _postmaster(launcher)
        assert old is not None
        old.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()

        outcomes: Counter[str] = Counter()
        back_at: float | None = None
        while True:
            now = time.monotonic()
            assert now - killed_at < BACK_WITHIN_S, (outcomes, launcher.output()[-3000:])
            current = _postmaster(launcher)
            if back_at is None and current is not None and current.pid != old.pid:
                back_at = now
            try:
                await client.issues.CreateIssue(
                    issues_pb2.CreateIssueRequest(
                        company_id=company.id,
                        title="During the outage",
                        request_id=str(uuid.uuid4()),
                    ),
                    timeout=5,
                )
            except PaperclipError as err:
                outcomes[f"{err.code.name} {err.reason}"] += 1
            else:
                outcomes["OK"] += 1
                if back_at is not None:
                    break
            await asyncio.sleep(0.1)
        served_at = time.monotonic()

    assert back_at is not None
    assert served_at - back_at <= SERVES_WITHIN_S, (served_at - back_at, outcomes)
    refused = {key for key in outcomes if key != "OK"}
    assert refused, "no call saw the outage"
    assert refused <= {"UNAVAILABLE DATABASE_UNAVAILABLE"}, outcomes
    # Nothing was restarted but PostgreSQL; the launcher said what happened.
    assert launcher.proc.poll() is None
    now_services = {p.pid for p in _descendants(launcher.proc.pid) if p.name() != "postgres"}
    assert services <= now_services, (services, now_services)
    output = launcher.output()
    assert "the embedded PostgreSQL stopped; restarting it" in output
    assert "the embedded PostgreSQL is back after" in output
