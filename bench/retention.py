"""The retention sweep at scale: 1,000,000 run events of 100,000 finished runs.

Seeded with ``INSERT ... SELECT generate_series`` (runs finished 40 days ago, ten
events each), then swept by the run service's policies (``run_service.retention``,
the default horizons, batch and pause) in this process, the same code its periodic job
runs. Figures: time per batch (p50, p99, max) and in total per table; the checkout
cycle's throughput through the issue service while the sweep runs, as a ratio to the
mean of the same load without it just before and just after (aim >= 0.8); table and
index sizes before, after the sweep and after a plain VACUUM.

Standalone: ``python -m bench.retention`` (its own database and issue service).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from bench import run_cycle
from bench.bench_database import bench_database
from bench.issue_cycle import grpc_cycle, seed
from bench.processes import KEY, service_process
from bench.stats import run_load
from common.config import load_settings
from common.database_url import asyncpg_dsn
from common.db import Database
from common.retention import sweep
from run_service import retention

RUNS = 100_000
EVENTS_PER_RUN = 10
CLIENTS = 16
SECONDS = 8.0
AIM_RATIO = 0.8
TABLES = ("runs.run_events", "runs.heartbeat_runs")

_SEED_RUNS = """
    INSERT INTO runs.heartbeat_runs (company_id, agent_id, status, created_at, started_at,
                                     finished_at, next_event_seq)
    SELECT $1, $2, 'succeeded', now() - interval '41 days', now() - interval '41 days',
           now() - interval '40 days' + g * interval '1 millisecond', $3 + 1
    FROM generate_series(1, $4) AS g
"""
_SEED_EVENTS = """
    INSERT INTO runs.run_events (run_id, seq, type, message, created_at)
    SELECT r.id, s, 'stdout', 'a line of output from the agent, ' || s,
           now() - interval '40 days'
    FROM runs.heartbeat_runs r, generate_series(1, $2) AS s
    WHERE r.agent_id = $1
"""
_SIZES = """
    SELECT pg_table_size($1::regclass) AS table_bytes,
           pg_indexes_size($1::regclass) AS index_bytes,
           pg_total_relation_size($1::regclass) AS total_bytes
"""


async def _seed(conn: asyncpg.Connection) -> None:
    prefix = "R" + uuid.uuid4().hex[:6].upper().translate(str.maketrans("0123456789", "GHIJKLMNOP"))
    company = await conn.fetchval(
        "INSERT INTO issues.companies (name, issue_prefix) VALUES ('retention', $1) RETURNING id",
        prefix,
    )
    agent = await conn.fetchval(
        "INSERT INTO runs.agents (company_id, name, name_key) VALUES ($1, 'r', 'r') RETURNING id",
        company,
    )
    await conn.execute(_SEED_RUNS, company, agent, EVENTS_PER_RUN, RUNS)
    # WatchRun's NOTIFY per inserted event is not what is measured here.
    await conn.execute("ALTER TABLE runs.run_events DISABLE TRIGGER run_events_notify")
    try:
        await conn.execute(_SEED_EVENTS, agent, EVENTS_PER_RUN)
    finally:
        await conn.execute("ALTER TABLE runs.run_events ENABLE TRIGGER run_events_notify")
    # Settled before anything is timed: no autovacuum of the seed during the loads.
    await conn.execute("VACUUM (ANALYZE) runs.heartbeat_runs")
    await conn.execute("VACUUM (ANALYZE) runs.run_events")


async def _sizes(conn: asyncpg.Connection) -> dict[str, dict[str, int]]:
    sizes: dict[str, dict[str, int]] = {}
    for table in TABLES:
        row = await conn.fetchrow(_SIZES, table)
        assert row is not None
        rows = await conn.fetchval(f"SELECT count(*) FROM {table}")
        sizes[table] = {**{k: int(v) for k, v in row.items()}, "rows": int(rows)}
    return sizes


def _batch_figures(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    if not ordered:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


async def measure_retention(database_url: str, issue_address: str, key: bytes) -> dict[str, Any]:
    """Seed, measure the checkout cycle alone, then again while the sweep runs; sizes."""
    dsn = asyncpg_dsn(database_url)
    conn = await asyncpg.connect(dsn)
    db = Database(database_url, pool_size=4, max_overflow=0, name="bench-retention")
    channel = grpc.aio.insecure_channel(issue_address)
    try:
        started = time.perf_counter()
        await _seed(conn)
        seed_seconds = time.perf_counter() - started
        before = await _sizes(conn)
        seats = await seed(conn, CLIENTS)
        await run_cycle.hold_runs(conn, [s.run_id for s in seats])
        cycle = grpc_cycle(channel, seats, key)
        alone = await run_load("checkout_release", cycle, clients=CLIENTS, seconds=SECONDS)
        # The documented defaults, or the PAPERCLIP_RETENTION_* of the environment.
        env = {k: v for k, v in os.environ.items() if k.startswith("PAPERCLIP_RETENTION_")}
        settings = load_settings(
            {
                **env,
                "PAPERCLIP_HOME": tempfile.gettempdir(),
                "PAPERCLIP_INTERNAL_KEY": key.decode(),
                "PAPERCLIP_JWT_SECRET": "bench-retention",
            }
        )
        task = asyncio.create_task(
            sweep(
                db,
                retention.policies(settings),
                lock_key=retention.LOCK_KEY,
                batch=settings.retention_batch_rows,
                pause=settings.retention_batch_pause_seconds,
            )
        )
        swept_from = time.perf_counter()
        during = await run_load(
            "checkout_release_during_sweep", cycle, clients=CLIENTS, seconds=SECONDS
        )
        sweep_running_at_end = not task.done()
        result = await task
        sweep_seconds = time.perf_counter() - swept_from
        after = await _sizes(conn)
        await conn.execute("VACUUM runs.run_events")
        await conn.execute("VACUUM runs.heartbeat_runs")
        vacuumed = await _sizes(conn)
        # The same load once more without the sweep: the machine's drift shows.
        alone_after = await run_load("checkout_release", cycle, clients=CLIENTS, seconds=SECONDS)
    finally:
        await channel.close()
        await db.dispose()
        await conn.close()
    baseline = (alone.ops_per_s + alone_after.ops_per_s) / 2
    tables = {
        t.label: {
            "deleted": t.deleted,
            "batches": t.batches,
            "seconds": round(t.seconds, 2),
            **_batch_figures(t.batch_seconds),
        }
        for t in result.tables
    }
    return {
        "seeded": {
            "runs": RUNS,
            "events": RUNS * EVENTS_PER_RUN,
            "seconds": round(seed_seconds, 1),
        },
        "batch_rows": settings.retention_batch_rows,
        "pause_ms": round(settings.retention_batch_pause_seconds * 1000),
        "sweep_seconds": round(sweep_seconds, 2),
        "sweep_outlasted_load": sweep_running_at_end,
        "tables": tables,
        "checkout_alone": alone.as_dict(),
        "checkout_during_sweep": during.as_dict(),
        "checkout_alone_after": alone_after.as_dict(),
        "ratio": round(during.ops_per_s / baseline, 3) if baseline else 0.0,
        "sizes": {"before": before, "after": after, "after_vacuum": vacuumed},
    }


def _mib(value: int) -> str:
    return f"{value / (1024 * 1024):.1f} MiB"


def table(figures: dict[str, Any]) -> str:
    """The figures for people."""
    lines = [
        f"seeded {figures['seeded']['runs']:,} finished runs, {figures['seeded']['events']:,} "
        f"events in {figures['seeded']['seconds']} s; batch {figures['batch_rows']} rows, "
        f"pause {figures['pause_ms']} ms",
        f"{'table':34} {'deleted':>9} {'batches':>7} {'total s':>8} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}",
    ]
    for label, t in figures["tables"].items():
        lines.append(
            f"{label:34} {t['deleted']:>9,} {t['batches']:>7} {t['seconds']:>8} "
            f"{t['p50_ms']:>7} {t['p99_ms']:>7} {t['max_ms']:>7}"
        )
    alone, during = figures["checkout_alone"], figures["checkout_during_sweep"]
    after = figures["checkout_alone_after"]
    lines.append(
        f"checkout/release x{alone['clients']}: {alone['ops_per_s']:.0f}/s alone before, "
        f"{during['ops_per_s']:.0f}/s during the sweep, {after['ops_per_s']:.0f}/s alone after "
        f"(p99 {alone['p99_ms']:.1f} / {during['p99_ms']:.1f} / {after['p99_ms']:.1f} ms); "
        f"ratio to the mean of the two alone {figures['ratio']:.2f}"
    )
    for table_name in TABLES:
        sizes = [figures["sizes"][k][table_name] for k in ("before", "after", "after_vacuum")]
        rows = " -> ".join(f"{s['rows']:,}" for s in sizes)
        data = " -> ".join(_mib(s["table_bytes"]) for s in sizes)
        indexes = " -> ".join(_mib(s["index_bytes"]) for s in sizes)
        lines.append(
            f"{table_name}: rows {rows}; table {data}; indexes {indexes} "
            "(before, after the sweep, after VACUUM)"
        )
    return "\n".join(lines)


def aims(figures: dict[str, Any]) -> list[str]:
    """The aim of this section and whether it was met."""
    met = figures["ratio"] >= AIM_RATIO
    note = "" if figures["sweep_outlasted_load"] else " (the sweep ended before the load did)"
    return [
        f"aim: checkout throughput during the sweep >= {AIM_RATIO} of without: "
        f"{figures['ratio']:.2f}, {'met' if met else 'NOT met'}{note}"
    ]


def main() -> int:
    """This section alone: its own database (embedded unless PAPERCLIP_BENCH_DATABASE_URL
    names a server) and issue service process; prints, writes nothing."""
    external = os.environ.get("PAPERCLIP_BENCH_DATABASE_URL")
    with tempfile.TemporaryDirectory(prefix="paperclip-bench-") as tmp, ExitStack() as stack:
        home = Path(tmp)
        database_url = stack.enter_context(bench_database(home, external))
        address = stack.enter_context(
            service_process(
                "issue_service",
                database_url,
                home,
                {
                    "PAPERCLIP_ISSUE_SERVICE_ADDR": "127.0.0.1:0",
                    "PAPERCLIP_RETENTION_SWEEP_SECONDS": "0",
                },
            )
        )
        print("retention: the sweep of 1M run events and 100k finished runs", flush=True)
        figures = asyncio.run(measure_retention(database_url, address, KEY))
    print()
    print(table(figures))
    print(json.dumps(figures["tables"], indent=2))
    print("\n".join(aims(figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
