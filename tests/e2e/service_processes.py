"""The issue and run services as separate processes on a database of a test's own,
started with the environment ``local_suite.launcher`` builds, and the test's agents."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import psutil

from common.db import Database
from common.sql import Row, sql
from supervision import process_group
from tests.harness import INTERNAL_KEY
from tests.waiting import wait_until


class ServiceProcesses:
    """Services started with ``python -m <module>``; ``extra`` env on top of the base."""

    def __init__(self, url: str, home: Path, *, jwt_secret: str, **extra: str) -> None:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("PAPERCLIP_")}
        self.env = {
            **inherited,
            "PAPERCLIP_HOME": str(home),
            "PAPERCLIP_DATABASE_URL": url,
            "PAPERCLIP_INTERNAL_KEY": INTERNAL_KEY.decode(),
            "PAPERCLIP_JWT_SECRET": jwt_secret,
            "PAPERCLIP_GATEWAY_ADDR": "127.0.0.1:1",
            "PAPERCLIP_ISSUE_SERVICE_ADDR": "127.0.0.1:0",
            "PAPERCLIP_RUN_SERVICE_ADDR": "127.0.0.1:0",
            "PAPERCLIP_DISPATCH_POLL_MS": "200",
            "PAPERCLIP_LOG_LEVEL": "WARNING",
            **extra,
        }
        self.home = home
        self.children: list[process_group.Child] = []

    def start(self, module: str, addr_env: str) -> process_group.Child:
        """Start one service and wait until it serves; the issue service's address is
        handed to the services started after it."""
        spec = process_group.ProcessSpec(module, addr_env)
        ready = self.home / f"{module}-{len(self.children)}.json"
        child = process_group.spawn(spec, self.env, ready)
        self.children.append(child)
        addr = process_group.wait_ready(child, timeout=60, stop_requested=lambda: False)
        if module == "issue_service":
            self.env["PAPERCLIP_ISSUE_SERVICE_ADDR"] = addr
        return child

    def stop(self) -> None:
        live = [c for c in self.children if c.process.poll() is None]
        process_group.stop_all(live, grace=10)


def agent_processes(marker: str) -> list[psutil.Process]:
    """Live agent processes whose command line carries ``marker``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if marker in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def kill_agents(marker: str) -> None:
    """Kill every agent process carrying ``marker``."""
    for proc in agent_processes(marker):
        with contextlib.suppress(psutil.Error):
            proc.kill()


async def rows(db: Database, query: str, **params: object) -> list[Row]:
    """The rows of one query, in a unit of work of its own."""
    async with db.unit_of_work() as tx:
        return await tx.fetch(sql(query), params)


async def settled(db: Database, *, column: str, value: str, within: float) -> None:
    """Until no run of ``column`` = ``value`` (``company_id`` or ``agent_id``) is queued or
    running and none of its wakes waits, twice 2 s apart: a run's after-steps may queue
    one more (the comment policy's retry of an assignment run that wrote no comment)
    just after it ended."""
    if column not in ("company_id", "agent_id"):
        raise ValueError(f"no such key: {column}")

    async def quiet() -> bool:
        found = await rows(
            db,
            f"""
            SELECT (SELECT count(*) FROM runs.heartbeat_runs
                    WHERE {column} = :v AND status IN ('queued', 'running')) AS runs,
                   (SELECT count(*) FROM runs.wakeup_requests
                    WHERE {column} = :v AND status IN ('queued', 'claimed', 'deferred')) AS wakes
            """,
            v=value,
        )
        return int(found[0]["runs"]) == 0 and int(found[0]["wakes"]) == 0

    for attempt in range(2):
        if attempt:
            await asyncio.sleep(2)
        await wait_until(quiet, within=within, what="every run ended and every wake dealt with")
