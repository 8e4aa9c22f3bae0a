"""The run service under load: wake -> child started latency next to a bare spawn of the
same program, sustained runs per second, and the two recovery sweeps over a large history.

**Start latency** (``wake_to_started``). One issue-less ``WakeAgent`` at a time to the
``python -m run_service`` process the bench started (signed as a service, as the gateway
signs a board call), for an agent whose command is ``[python, tests/agents/succeed.py]``.
The clock starts before the call is sent and stops when a listener on
``paperclip_run_events`` (LISTEN, its own connection) receives the run's first event
notification: the ``run started`` lifecycle event, written in the same transaction as
the pid, process group and create time (so the process has been spawned and its
identity is committed). The next wake is sent once the run is seen terminal (an
issue-less wake would otherwise be merged into the live run). ``wake_to_started_issue``
is the same with a fresh unassigned todo issue per wake: the run first takes the
issue's execution lock on the issue service (one more gRPC call) before it spawns.

Next to it, interleaved sample by sample in the same run: ``bare_spawn`` (the
``create_subprocess_exec`` of the same argv, new session, piped output, until it returns,
i.e. the child exists) and ``bare_spawn_and_wait`` (until it has exited and its output is
read). ``wake_to_succeeded`` is the whole run as a client sees it (wake sent -> status
``succeeded`` read), to compare with ``bare_spawn_and_wait``.

**Throughput**: 200 issue wakes (one fresh unassigned todo issue each, so no wake
coalesces) over 10 agents with ``max_concurrent_runs`` 5, sent 20 at a time; from the first
wake sent until every run is terminal (polled every 20 ms). The run service's node cap
(``PAPERCLIP_MAX_PROCESSES``, 32 by default) bounds the concurrency below 10 x 5.

**Sweeps**: a fresh company with 100 agents, 10,000 agent-assigned issues (40 % done, 30 %
todo, 30 % in_progress) and 100,000 finished runs (the latest run of every todo issue
succeeded, older runs mixed succeeded/failed/cancelled/timed_out, 10 % without issue),
plus 1,000 running runs of in_progress issues owned by a live node on another host, all
written by ``INSERT ... SELECT generate_series``, then ``ANALYZE`` (as autovacuum would).
Nothing in that data is actionable, so passes are repeatable and have no side effects:
``ReapOrphanedRuns`` finds no dead node's run and ``ReconcileStrandedIssues`` reads its
500 candidates and skips them (the decision table says skip). Both are called as
functions in this process (``reap_orphaned_runs`` on an in-process ``Runner`` registered
as a node but not dispatching; ``reconcile_stranded_issues`` over every company) with a
service actor; one warm-up pass, then ``SWEEP_REPEATS`` passes, p50 and max. The main
statements of each pass are shown with ``EXPLAIN (ANALYZE, BUFFERS)`` and any ``Seq Scan``
on ``heartbeat_runs``, ``issues``, ``agents`` or ``wakeup_requests`` is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from bench.stats import Series
from common.actor import service_actor, sign_actor
from common.config import load_settings
from common.database_url import asyncpg_dsn
from common.db import Database
from common.sql import Query
from paperclip.runs.v1 import run_messages_pb2, runs_pb2, runs_pb2_grpc
from run_service import node_store, recovery, recovery_store, stranded_store
from run_service import reconcile as reconcile_module
from run_service.runner import Runner

AGENT_SCRIPT = Path(__file__).resolve().parents[1] / "tests" / "agents" / "succeed.py"
ARGV = [sys.executable, str(AGENT_SCRIPT)]
LATENCY_SAMPLES = int(os.environ.get("PAPERCLIP_BENCH_RUN_SAMPLES", "100"))
LATENCY_WARMUP = 5
THROUGHPUT_RUNS = 200
THROUGHPUT_AGENTS = 10
THROUGHPUT_MAX_CONCURRENT = 5
THROUGHPUT_SENDERS = 20
SWEEP_AGENTS = 100
SWEEP_ISSUES = 10_000
SWEEP_FINISHED_RUNS = 100_000
SWEEP_REPEATS = 5
RUN_TIMEOUT_S = 30.0
TERMINAL = ("succeeded", "failed", "cancelled", "timed_out")
EVENTS_CHANNEL = "paperclip_run_events"
SCANNED_TABLES = ("heartbeat_runs", "issues", "agents", "wakeup_requests")

#: What issue 4 aims at; the bench reports whether a run met it, it does not enforce it.
AIM_START_OVER_BARE_P50_MS = 20.0
AIM_SWEEP_MS = 200.0


class RunEvents:
    """LISTEN ``paperclip_run_events``: when each run's first event was notified, and a
    wake-up for whoever waits on a run."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self._signals: dict[str, asyncio.Event] = {}

    def on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        now = time.perf_counter()
        run_id = str(payload)
        self.first.setdefault(run_id, now)
        self.signal(run_id).set()

    def signal(self, run_id: str) -> asyncio.Event:
        return self._signals.setdefault(run_id, asyncio.Event())

    async def started(self, run_id: str) -> float:
        """When the run's first event (``run started``) was notified."""
        deadline = time.perf_counter() + RUN_TIMEOUT_S
        while run_id not in self.first:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"run {run_id} never started")
            signal = self.signal(run_id)
            signal.clear()
            if run_id in self.first:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(signal.wait(), timeout=0.5)
        return self.first[run_id]

    async def terminal(self, conn: asyncpg.Connection, run_id: str) -> tuple[float, str]:
        """When the run was first read terminal (checked at each of its events and every
        50 ms), and its status."""
        deadline = time.perf_counter() + RUN_TIMEOUT_S
        signal = self.signal(run_id)
        while True:
            signal.clear()
            status = await conn.fetchval(
                "SELECT status FROM runs.heartbeat_runs WHERE id = $1", run_id
            )
            if status in TERMINAL:
                return time.perf_counter(), str(status)
            if time.perf_counter() > deadline:
                raise TimeoutError(f"run {run_id} never ended ({status})")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(signal.wait(), timeout=0.05)

    def forget(self, run_id: str) -> None:
        self._signals.pop(run_id, None)


async def _bare(series_spawn: Series, series_wait: Series) -> None:
    began = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *ARGV,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    spawned = time.perf_counter()
    await proc.communicate()
    ended = time.perf_counter()
    if proc.returncode != 0:
        raise RuntimeError(f"bare spawn exited {proc.returncode}")
    series_spawn.samples.append((spawned - began) * 1000)
    series_wait.samples.append((ended - began) * 1000)


# --- seeding -------------------------------------------------------------------------


def _prefix() -> str:
    return "R" + uuid.uuid4().hex[:6].upper().translate(str.maketrans("0123456789", "GHIJKLMNOP"))


async def _company(conn: asyncpg.Connection, name: str) -> tuple[str, str]:
    prefix = _prefix()
    company = await conn.fetchval(
        "INSERT INTO issues.companies (name, issue_prefix) VALUES ($1, $2) RETURNING id",
        name,
        prefix,
    )
    return str(company), prefix


async def _agents(
    conn: asyncpg.Connection, company: str, name: str, count: int, *, max_concurrent: int = 5
) -> list[str]:
    """``count`` active process agents running ``ARGV``, named ``<name>-<n>``."""
    rows = await conn.fetch(
        """
        INSERT INTO runs.agents
            (company_id, name, name_key, adapter_config, max_concurrent_runs, grace_seconds)
        SELECT $1, $2 || '-' || g, $2 || '-' || g, $3::jsonb, $4, 1
        FROM generate_series(1, $5::int) g
        ORDER BY g
        RETURNING id
        """,
        company,
        name,
        json.dumps({"command": ARGV, "cwd": "", "env": {}}),
        max_concurrent,
        count,
    )
    return [str(r["id"]) for r in rows]


async def _issues(conn: asyncpg.Connection, company: str, prefix: str, count: int) -> list[str]:
    """``count`` unassigned todo issues, numbered after the company's last one."""
    start = await conn.fetchval(
        "UPDATE issues.companies SET issue_counter = issue_counter + $2 WHERE id = $1 "
        "RETURNING issue_counter - $2",
        company,
        count,
    )
    rows = await conn.fetch(
        """
        INSERT INTO issues.issues (company_id, issue_number, identifier, title, status)
        SELECT $1, g, $2 || '-' || g, 'bench run', 'todo'
        FROM generate_series($3::bigint + 1, $3::bigint + $4) g
        ORDER BY g
        RETURNING id
        """,
        company,
        prefix,
        start,
        count,
    )
    return [str(r["id"]) for r in rows]


async def hold_runs(conn: asyncpg.Connection, run_ids: Sequence[str]) -> None:
    """Put runs the bench wrote as ``running`` under a live supervisor node of another
    host (lease of a day), so that no recovery pass takes them for orphans."""
    node = await conn.fetchval(
        """
        INSERT INTO runs.supervisor_nodes
            (host, boot_id, pid, process_started_at, max_processes, lease_expires_at)
        VALUES ('bench-client-host', 'bench', 1, now(), 32, now() + interval '1 day')
        RETURNING id
        """
    )
    await conn.execute(
        "UPDATE runs.heartbeat_runs SET supervisor_node_id = $1 WHERE id = ANY($2::uuid[])",
        node,
        list(run_ids),
    )


async def _drain(conn: asyncpg.Connection) -> None:
    """Until no run is queued (wakes made of earlier workloads' events), 30 s at most."""
    deadline = time.perf_counter() + 30.0
    while time.perf_counter() < deadline:
        if not await conn.fetchval(
            "SELECT count(*) FROM runs.heartbeat_runs WHERE status = 'queued'"
        ):
            return
        await asyncio.sleep(0.2)
    print("  (runs of earlier workloads still queued; measuring anyway)", flush=True)


# --- latency and throughput ---------------------------------------------------------


@dataclass
class _Waker:
    stub: Any
    key: bytes

    async def wake(self, agent_id: str, issue_id: str | None = None) -> str:
        reply = await self.stub.WakeAgent(
            runs_pb2.WakeAgentRequest(
                agent_id=agent_id,
                source=run_messages_pb2.WAKE_SOURCE_ON_DEMAND,
                reason="bench",
                issue_id=issue_id or "",
            ),
            metadata=sign_actor(service_actor("bench"), self.key),
            timeout=RUN_TIMEOUT_S,
        )
        if not reply.run.id:
            raise RuntimeError(f"the wake queued no run: {reply.wakeup_request}")
        return str(reply.run.id)


async def _latency(
    conn: asyncpg.Connection, events: RunEvents, waker: _Waker, agent: str, issues: list[str]
) -> dict[str, Series]:
    series = {
        name: Series(name)
        for name in (
            "bare_spawn",
            "bare_spawn_and_wait",
            "wake_to_started",
            "wake_to_succeeded",
            "wake_to_started_issue",
        )
    }
    statuses: list[str] = []
    for index in range(LATENCY_WARMUP + LATENCY_SAMPLES):
        record = index >= LATENCY_WARMUP
        spawn, wait = (
            (series["bare_spawn"], series["bare_spawn_and_wait"]) if record else (Series("w"),) * 2
        )
        await _bare(spawn, wait)
        for issue in (None, issues[index]):
            began = time.perf_counter()
            run_id = await waker.wake(agent, issue)
            started = await events.started(run_id)
            ended, status = await events.terminal(conn, run_id)
            events.forget(run_id)
            statuses.append(status)
            if not record:
                continue
            if issue is None:
                series["wake_to_started"].samples.append((started - began) * 1000)
                series["wake_to_succeeded"].samples.append((ended - began) * 1000)
            else:
                series["wake_to_started_issue"].samples.append((started - began) * 1000)
    bad = [s for s in statuses if s != "succeeded"]
    if bad:
        raise RuntimeError(f"{len(bad)} latency runs did not succeed: {sorted(set(bad))}")
    return series


async def _throughput(
    conn: asyncpg.Connection, waker: _Waker, agents: list[str], issues: list[str]
) -> dict[str, Any]:
    queue = list(enumerate(issues))
    run_ids: list[str] = []

    async def sender() -> None:
        while queue:
            index, issue = queue.pop()
            run_ids.append(await waker.wake(agents[index % len(agents)], issue))

    began = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(THROUGHPUT_SENDERS)))
    queued = time.perf_counter()
    peak = 0
    while True:
        row = await conn.fetchrow(
            """
            SELECT count(*) FILTER (WHERE status IN ('succeeded','failed','cancelled',
                                                     'timed_out')) AS done,
                   count(*) FILTER (WHERE status = 'running') AS running
            FROM runs.heartbeat_runs WHERE id = ANY($1::uuid[])
            """,
            run_ids,
        )
        assert row is not None
        peak = max(peak, int(row["running"]))
        if row["done"] == len(run_ids):
            break
        if time.perf_counter() - began > 120:
            raise TimeoutError(f"only {row['done']} of {len(run_ids)} runs ended")
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - began
    statuses = await conn.fetch(
        "SELECT status, count(*) AS n FROM runs.heartbeat_runs WHERE id = ANY($1::uuid[]) "
        "GROUP BY status",
        run_ids,
    )
    phases = await conn.fetchrow(
        """
        SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY
                   extract(epoch FROM started_at - created_at)) * 1000 AS queued_ms,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY
                   extract(epoch FROM finished_at - started_at)) * 1000 AS claimed_to_end_ms
        FROM runs.heartbeat_runs WHERE id = ANY($1::uuid[])
        """,
        run_ids,
    )
    assert phases is not None
    ceiling = await _bare_ceiling(len(run_ids), peak)
    return {
        "runs": len(run_ids),
        "agents": len(agents),
        "max_concurrent_runs": THROUGHPUT_MAX_CONCURRENT,
        "seconds": round(elapsed, 3),
        "wakes_sent_seconds": round(queued - began, 3),
        "runs_per_s": round(len(run_ids) / elapsed, 1),
        "peak_running_sampled": peak,
        "statuses": {str(r["status"]): int(r["n"]) for r in statuses},
        "p50_queued_ms": round(float(phases["queued_ms"]), 1),
        "p50_claimed_to_end_ms": round(float(phases["claimed_to_end_ms"]), 1),
        "bare_ceiling_runs_per_s": ceiling,
    }


async def _bare_ceiling(count: int, concurrency: int) -> float:
    """``count`` bare spawn-and-waits of the same program, ``concurrency`` at a time: what
    this machine can do without the service (the same peak concurrency)."""
    left = [count]

    async def worker() -> None:
        sink = Series("ceiling")
        while left[0] > 0:
            left[0] -= 1
            await _bare(sink, sink)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return round(count / (time.perf_counter() - began), 1)


# --- sweeps -------------------------------------------------------------------------

_SEED_ISSUES = """
    WITH a AS (SELECT array_agg(id ORDER BY name_key) AS ids FROM runs.agents
               WHERE company_id = $1)
    INSERT INTO issues.issues
        (company_id, issue_number, identifier, title, status, assignee_agent_id,
         started_at, completed_at, created_at, updated_at)
    SELECT $1, g, $2 || '-' || g, 'sweep ' || g,
           CASE WHEN g % 10 < 4 THEN 'done' WHEN g % 10 < 7 THEN 'todo'
                ELSE 'in_progress' END,
           a.ids[1 + g % cardinality(a.ids)],
           CASE WHEN g % 10 < 4 OR g % 10 >= 7 THEN now() - interval '1 day' END,
           CASE WHEN g % 10 < 4 THEN now() - interval '1 hour' END,
           now() - interval '2 days', now() - interval '1 hour'
    FROM a, generate_series(1, $3::int) g
"""
# History: issue number g = 1 + (i * 7919) % N, moved off in_progress issues (which get no
# finished run: the reconcile pass would requeue a continuation for them).
_SEED_HISTORY = """
    INSERT INTO runs.heartbeat_runs
        (company_id, agent_id, issue_id, status, invocation_source, wake_reason,
         supervisor_node_id, process_pid, process_group_id, process_started_at,
         exit_code, error_code, error, created_at, started_at, finished_at, updated_at)
    SELECT $1, i.assignee_agent_id, i.id, s.status, 'assignment', 'issue_assigned',
           $3::uuid, 1000 + g % 30000, 1000 + g % 30000, s.at, s.exit_code, s.error_code,
           s.error, s.at, s.at, s.at + interval '30 seconds', s.at + interval '30 seconds'
    FROM generate_series(1, $2::int) g
    CROSS JOIN LATERAL (
        SELECT (1 + (g::bigint * 7919) % $4::int) AS n
    ) p
    CROSS JOIN LATERAL (
        SELECT CASE WHEN p.n % 10 >= 7 THEN p.n - 3 ELSE p.n END AS n
    ) q
    JOIN issues.issues i ON i.company_id = $1 AND i.issue_number = q.n
    CROSS JOIN LATERAL (
        SELECT now() - interval '1 hour' - g * interval '10 seconds' AS at,
               CASE WHEN g % 20 < 16 THEN 'succeeded' WHEN g % 20 < 18 THEN 'failed'
                    WHEN g % 20 = 18 THEN 'cancelled' ELSE 'timed_out' END AS status,
               CASE WHEN g % 20 < 16 THEN 0 WHEN g % 20 < 18 THEN 1 END AS exit_code,
               CASE WHEN g % 20 < 16 THEN NULL WHEN g % 20 < 18 THEN 'adapter_failed'
                    WHEN g % 20 = 18 THEN 'cancelled' ELSE 'timeout' END AS error_code,
               CASE WHEN g % 20 >= 16 THEN 'bench history' END AS error
    ) s
"""
_SEED_ISSUELESS = """
    WITH a AS (SELECT array_agg(id ORDER BY name_key) AS ids FROM runs.agents
               WHERE company_id = $1)
    INSERT INTO runs.heartbeat_runs
        (company_id, agent_id, status, invocation_source, wake_reason, supervisor_node_id,
         process_pid, process_group_id, process_started_at, exit_code, created_at,
         started_at, finished_at, updated_at)
    SELECT $1, a.ids[1 + g % cardinality(a.ids)], 'succeeded', 'timer', 'heartbeat_timer',
           $3::uuid, 2000 + g, 2000 + g, now() - g * interval '37 seconds', 0,
           now() - g * interval '37 seconds', now() - g * interval '37 seconds',
           now() - g * interval '37 seconds' + interval '5 seconds',
           now() - g * interval '37 seconds' + interval '5 seconds'
    FROM a, generate_series(1, $2::int) g
"""
# The latest run of every todo issue: succeeded (the pass skips the issue).
_SEED_LATEST = """
    INSERT INTO runs.heartbeat_runs
        (company_id, agent_id, issue_id, status, invocation_source, wake_reason,
         supervisor_node_id, process_pid, process_group_id, process_started_at, exit_code,
         created_at, started_at, finished_at, updated_at)
    SELECT $1, i.assignee_agent_id, i.id, 'succeeded', 'assignment', 'issue_assigned',
           $2::uuid, 3000, 3000, now() - interval '10 minutes', 0,
           now() - interval '10 minutes', now() - interval '10 minutes',
           now() - interval '9 minutes', now() - interval '9 minutes'
    FROM issues.issues i WHERE i.company_id = $1 AND i.status = 'todo'
"""
# A third of the in_progress issues have a live run on a node of another host.
_SEED_RUNNING = """
    INSERT INTO runs.heartbeat_runs
        (company_id, agent_id, issue_id, status, invocation_source, wake_reason,
         supervisor_node_id, process_pid, process_group_id, process_started_at,
         created_at, started_at, last_activity_at, updated_at)
    SELECT $1, i.assignee_agent_id, i.id, 'running', 'assignment', 'issue_assigned',
           $2::uuid, 4000, 4000, now() - interval '5 minutes', now() - interval '5 minutes',
           now() - interval '5 minutes', now(), now()
    FROM issues.issues i
    WHERE i.company_id = $1 AND i.status = 'in_progress' AND i.issue_number % 3 = 0
    RETURNING id
"""
_SEED_REMOTE_NODE = """
    INSERT INTO runs.supervisor_nodes
        (host, boot_id, pid, process_started_at, max_processes, lease_expires_at)
    VALUES ('bench-remote-host', 'bench', 1, now(), 32, now() + interval '1 day')
    RETURNING id
"""


async def _seed_sweeps(conn: asyncpg.Connection) -> dict[str, Any]:
    began = time.perf_counter()
    async with conn.transaction():
        company, prefix = await _company(conn, "bench-sweeps")
        await _agents(conn, company, "sweep", SWEEP_AGENTS)
        await conn.execute(_SEED_ISSUES, company, prefix, SWEEP_ISSUES)
        await conn.execute(
            "UPDATE issues.companies SET issue_counter = $2 WHERE id = $1", company, SWEEP_ISSUES
        )
        old_node = str(uuid.uuid4())  # a node long gone (its row pruned)
        todo = int(
            await conn.fetchval(
                "SELECT count(*) FROM issues.issues WHERE company_id = $1 AND status = 'todo'",
                company,
            )
        )
        issueless = SWEEP_FINISHED_RUNS // 10
        history = SWEEP_FINISHED_RUNS - issueless - todo
        await conn.execute(_SEED_HISTORY, company, history, old_node, SWEEP_ISSUES)
        await conn.execute(_SEED_ISSUELESS, company, issueless, old_node)
        await conn.execute(_SEED_LATEST, company, old_node)
        remote = str(await conn.fetchval(_SEED_REMOTE_NODE))
        running = await conn.fetch(_SEED_RUNNING, company, remote)
    await conn.execute(
        "ANALYZE runs.heartbeat_runs, issues.issues, runs.agents, runs.wakeup_requests, "
        "runs.supervisor_nodes"
    )
    counts = await conn.fetchrow(
        """
        SELECT (SELECT count(*) FROM runs.heartbeat_runs) AS runs_total,
               (SELECT count(*) FROM runs.heartbeat_runs WHERE company_id = $1
                AND status NOT IN ('queued', 'running')) AS finished,
               (SELECT count(*) FROM issues.issues) AS issues_total,
               (SELECT count(*) FROM issues.issues WHERE company_id = $1) AS issues
        """,
        company,
    )
    assert counts is not None
    return {
        "company_id": company,
        "remote_node_id": remote,
        "finished_runs": int(counts["finished"]),
        "running_runs": len(running),
        "issues": int(counts["issues"]),
        "runs_in_database": int(counts["runs_total"]),
        "issues_in_database": int(counts["issues_total"]),
        "seed_seconds": round(time.perf_counter() - began, 2),
    }


async def _explain(conn: asyncpg.Connection, query: Query, params: dict[str, Any]) -> list[str]:
    rows = await conn.fetch(
        "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + query.text, *query.args(params)
    )
    return [str(r[0]) for r in rows]


def _seq_scans(plan: list[str]) -> list[str]:
    return [
        line.strip()
        for line in plan
        if "Seq Scan on" in line and any(f" {t} " in f"{line} " for t in SCANNED_TABLES)
    ]


async def _timed(fn: Any, repeats: int) -> tuple[Series, list[Any]]:
    series, outcomes = Series("pass"), []
    await fn()  # warm-up (plans, pools)
    for _ in range(repeats):
        began = time.perf_counter()
        outcomes.append(await fn())
        series.samples.append((time.perf_counter() - began) * 1000)
    return series, outcomes


async def _sweeps(
    conn: asyncpg.Connection, database_url: str, issue_addr: str, home: Path, key: bytes
) -> dict[str, Any]:
    seeded = await _seed_sweeps(conn)
    settings = load_settings(
        {
            "PAPERCLIP_HOME": str(home),
            "PAPERCLIP_DATABASE_URL": database_url,
            "PAPERCLIP_INTERNAL_KEY": key.decode(),
            "PAPERCLIP_JWT_SECRET": uuid.uuid4().hex,
            "PAPERCLIP_ISSUE_SERVICE_ADDR": issue_addr,
        }
    )
    assert settings.database_url is not None
    db = Database(settings.database_url, pool_size=5, max_overflow=5, name="bench-sweeps")
    runner = Runner(db, settings)  # every company, as in production; never dispatches
    actor = service_actor("bench")
    try:
        await runner._register()  # a node of this host, so that the pass has a "me"
        runner.recovery.periodic = False

        async def reap() -> Any:
            return await recovery.reap_orphaned_runs(db, runner, actor)

        contended = 0

        async def reconcile() -> Any:
            nonlocal contended
            for _ in range(20):
                reply = await reconcile_module.reconcile_stranded_issues(db, runner, actor)
                if reply.skipped or reply.issue_ids:
                    return reply
                # Empty counters: the run service's own periodic pass held the lock.
                contended += 1
                await asyncio.sleep(0.2)
            raise RuntimeError("the reconcile pass never got its lock")

        reap_series, reaped = await _timed(reap, SWEEP_REPEATS)
        rec_series, reconciled = await _timed(reconcile, SWEEP_REPEATS)
        me = runner.node_id
        plans = {
            "reap.dead_node_candidates": await _explain(
                conn, node_store.DEAD_NODE_CANDIDATES, {"me": me}
            ),
            "reap.orphan_runs": await _explain(
                conn,
                recovery_store.ORPHAN_RUNS,
                {
                    "nodes": [],
                    "nodeless": True,
                    "companies": None,
                    "limit": recovery.MAX_RUNS_PER_PASS,
                },
            ),
            "reconcile.candidates": await _explain(
                conn,
                stranded_store.CANDIDATES,
                {"companies": None, "limit": reconcile_module.DEFAULT_LIMIT},
            ),
        }
    finally:
        await runner.stop()
        await db.dispose()
    last = reconciled[-1]
    return {
        "seed": seeded,
        "reap_orphaned_runs": {
            **reap_series.summary(),
            "reaped": [int(r.reaped) for r in reaped],
            "detached": [len(r.detached_run_ids) for r in reaped],
        },
        "reconcile_stranded_issues": {
            **rec_series.summary(),
            "skipped": int(last.skipped),
            "requeued": int(last.dispatch_requeued + last.continuation_requeued),
            "escalated": int(last.escalated),
            "lock_contended_retries": contended,
        },
        "seq_scans": {name: _seq_scans(plan) for name, plan in plans.items()},
        "plans": plans,
    }


# --- entry point --------------------------------------------------------------------


async def measure_runs(
    database_url: str, run_addr: str, issue_addr: str, home: Path, key: bytes
) -> dict[str, Any]:
    """Every run-service figure (see the module docstring), as the JSON's ``runs`` key."""
    dsn = asyncpg_dsn(database_url)
    listener = await asyncpg.connect(dsn)
    conn = await asyncpg.connect(dsn)
    channel = grpc.aio.insecure_channel(run_addr)
    events = RunEvents()
    await listener.add_listener(EVENTS_CHANNEL, events.on_notify)
    try:
        await _drain(conn)
        waker = _Waker(runs_pb2_grpc.RunServiceStub(channel), key)
        company, prefix = await _company(conn, "bench-runs")
        (latency_agent,) = await _agents(conn, company, "latency", 1)
        latency_issues = await _issues(conn, company, prefix, LATENCY_WARMUP + LATENCY_SAMPLES)
        series = await _latency(conn, events, waker, latency_agent, latency_issues)
        print(_latency_lines(series), flush=True)
        agents = await _agents(
            conn, company, "load", THROUGHPUT_AGENTS, max_concurrent=THROUGHPUT_MAX_CONCURRENT
        )
        throughput_issues = await _issues(conn, company, prefix, THROUGHPUT_RUNS)
        throughput = await _throughput(conn, waker, agents, throughput_issues)
        print(
            f"  sustained: {throughput['runs']} runs over {throughput['agents']} agents in "
            f"{throughput['seconds']:.2f} s = {throughput['runs_per_s']:.1f} runs/s "
            f"(statuses {throughput['statuses']}, "
            f"peak running {throughput['peak_running_sampled']}; bare spawn-and-wait ceiling "
            f"at that concurrency {throughput['bare_ceiling_runs_per_s']:.1f}/s)",
            flush=True,
        )
        sweeps = await _sweeps(conn, database_url, issue_addr, home, key)
    finally:
        await channel.close()
        await listener.close()
        await conn.close()
    summaries = {name: s.summary() for name, s in series.items()}
    figures = {
        "start_p50_minus_bare_spawn_p50_ms": round(
            summaries["wake_to_started"]["p50_ms"] - summaries["bare_spawn"]["p50_ms"], 3
        ),
        "start_p50_minus_bare_spawn_and_wait_p50_ms": round(
            summaries["wake_to_started"]["p50_ms"] - summaries["bare_spawn_and_wait"]["p50_ms"],
            3,
        ),
        "issue_start_p50_minus_bare_spawn_p50_ms": round(
            summaries["wake_to_started_issue"]["p50_ms"] - summaries["bare_spawn"]["p50_ms"], 3
        ),
        "succeeded_p50_minus_bare_spawn_and_wait_p50_ms": round(
            summaries["wake_to_succeeded"]["p50_ms"] - summaries["bare_spawn_and_wait"]["p50_ms"],
            3,
        ),
        "runs_per_s": throughput["runs_per_s"],
        "reap_orphaned_runs_p50_ms": sweeps["reap_orphaned_runs"]["p50_ms"],
        "reconcile_stranded_issues_p50_ms": sweeps["reconcile_stranded_issues"]["p50_ms"],
    }
    return {
        "program": ARGV,
        "latency": summaries,
        "throughput": throughput,
        "sweeps": sweeps,
        "figures": figures,
    }


def _latency_lines(series: dict[str, Series]) -> str:
    lines = [f"  {'measure':24s} {'n':>4s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s}"]
    for s in series.values():
        m = s.summary()
        lines.append(
            f"  {s.name:24s} {m['n']:>4d} {m['p50_ms']:>8.2f} {m['p99_ms']:>8.2f} "
            f"{m['max_ms']:>8.2f}"
        )
    return "\n".join(lines)


def table(runs: dict[str, Any]) -> str:
    """The run-service figures as printed at the end of the bench."""
    lat = runs["latency"]
    header = f"{'run service':36s} {'n':>7s} {'p50 ms':>9s} {'p99 ms':>9s} {'max ms':>9s}"
    rows = [header, "-" * len(header)]
    for name, m in lat.items():
        rows.append(
            f"{name:36s} {m['n']:>7d} {m['p50_ms']:>9.2f} {m['p99_ms']:>9.2f} {m['max_ms']:>9.2f}"
        )
    sweeps = runs["sweeps"]
    for name in ("reap_orphaned_runs", "reconcile_stranded_issues"):
        m = sweeps[name]
        rows.append(
            f"{name:36s} {m['n']:>7d} {m['p50_ms']:>9.2f} {m['p99_ms']:>9.2f} {m['max_ms']:>9.2f}"
        )
    t = runs["throughput"]
    rows.append(
        f"sustained runs/s: {t['runs_per_s']:.1f} ({t['runs']} runs, {t['agents']} agents, "
        f"max {t['max_concurrent_runs']} each, {t['seconds']:.2f} s; p50 queued "
        f"{t['p50_queued_ms']:.0f} ms, claimed->end {t['p50_claimed_to_end_ms']:.0f} ms; "
        f"bare spawn-and-wait ceiling {t['bare_ceiling_runs_per_s']:.1f}/s)"
    )
    seed = sweeps["seed"]
    rows.append(
        f"sweep data: {seed['finished_runs']} finished + {seed['running_runs']} running runs, "
        f"{seed['issues']} issues in the sweep company ({seed['runs_in_database']} runs, "
        f"{seed['issues_in_database']} issues in the database; seeded in "
        f"{seed['seed_seconds']:.1f} s)"
    )
    for name, scans in sweeps["seq_scans"].items():
        rows.append(f"plan {name}: {'; '.join(scans) if scans else 'no Seq Scan on big tables'}")
    return "\n".join(rows)


def aims(runs: dict[str, Any]) -> list[str]:
    """One line per aim of issue 4, saying whether this run met it."""

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    f = runs["figures"]
    start = f["start_p50_minus_bare_spawn_p50_ms"]
    lines = [
        f"aim: wake -> started within {AIM_START_OVER_BARE_P50_MS:g} ms of the bare spawn at "
        f"p50 (issue-less wake; vs exec returned): +{start:.2f} ms, "
        f"{verdict(start <= AIM_START_OVER_BARE_P50_MS)}",
        f"     (vs bare spawn-and-wait: {f['start_p50_minus_bare_spawn_and_wait_p50_ms']:+.2f} "
        f"ms; issue wake vs bare spawn: {f['issue_start_p50_minus_bare_spawn_p50_ms']:+.2f} ms; "
        f"whole run vs spawn-and-wait: {f['succeeded_p50_minus_bare_spawn_and_wait_p50_ms']:+.2f}"
        " ms)",
    ]
    scans = runs["sweeps"]["seq_scans"]
    for name, plans in (
        ("reap_orphaned_runs", "reap."),
        ("reconcile_stranded_issues", "reconcile."),
    ):
        p50 = f[f"{name}_p50_ms"]
        scanned = [k for k, v in scans.items() if k.startswith(plans) and v]
        lines.append(
            f"aim: {name} < {AIM_SWEEP_MS:g} ms with {SWEEP_FINISHED_RUNS} runs / "
            f"{SWEEP_ISSUES} issues: p50 {p50:.2f} ms, {verdict(p50 < AIM_SWEEP_MS)}"
            + (f" (Seq Scan in {scanned})" if scanned else ", index plans")
        )
    return lines
