"""``python -m bench``: the issue service's checkout/release cycle at 1 and 16 clients,
next to a bare gRPC round trip and raw-SQL ceilings measured in the same run.

Uses an embedded PostgreSQL in a temporary directory unless PAPERCLIP_BENCH_DATABASE_URL
names a server (a fresh database is created on it and dropped afterwards). Prints a
table and writes ``bench/results/issue_cycle.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import grpc

from bench.issue_cycle import bare_round_trip, grpc_cycle, raw_cycle, seed
from bench.stats import Result, run_load
from common.embedded_pg import EmbeddedPostgres, asyncpg_dsn, normalize_database_url
from common.migrate import migrate

CLIENT_COUNTS = (1, 16)
SECONDS = float(os.environ.get("PAPERCLIP_BENCH_SECONDS", "5"))
RESULTS = Path(__file__).with_name("results")
KEY = uuid.uuid4().hex.encode()


def _database_in(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


def start_issue_service(database_url: str, home: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m issue_service`` as the bench's server process; its address."""
    ready = home / "issue_service.ready"
    env = {
        **os.environ,
        "PAPERCLIP_HOME": str(home),
        "PAPERCLIP_DATABASE_URL": database_url,
        "PAPERCLIP_INTERNAL_KEY": KEY.decode(),
        "PAPERCLIP_JWT_SECRET": uuid.uuid4().hex,
        "PAPERCLIP_READY_FILE": str(ready),
        "PAPERCLIP_ISSUE_SERVICE_ADDR": "127.0.0.1:0",
        "PAPERCLIP_LOG_LEVEL": "WARNING",
        "PAPERCLIP_DB_POOL_SIZE": "20",
    }
    proc = subprocess.Popen([sys.executable, "-m", "issue_service"], env=env)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the issue service did not start")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())["addr"]


async def measure(database_url: str, address: str) -> list[Result]:
    """Every workload at every client count, one after the other."""
    results: list[Result] = []
    dsn = asyncpg_dsn(database_url)
    pool = await asyncpg.create_pool(dsn, min_size=16, max_size=16)
    channel = grpc.aio.insecure_channel(address)
    try:
        for clients in CLIENT_COUNTS:
            async with pool.acquire() as conn:
                seats = await seed(conn, clients)  # type: ignore[arg-type]
            workloads = [
                ("bare_grpc_round_trip", bare_round_trip(channel)),
                ("checkout_release_via_service", grpc_cycle(channel, seats, KEY)),
                ("checkout_release_raw_same_sql", raw_cycle(pool, seats, minimal=False)),
                ("checkout_release_raw_minimal_sql", raw_cycle(pool, seats, minimal=True)),
            ]
            for name, operation in workloads:
                result = await run_load(name, operation, clients=clients, seconds=SECONDS)
                results.append(result)
                print(
                    f"  {name:36s} c={clients:<3d} {result.ops_per_s:>9.1f} ops/s "
                    f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms",
                    flush=True,
                )
    finally:
        await channel.close()
        await pool.close()
    return results


def ratios(results: list[Result]) -> dict[str, float]:
    """Service throughput as a fraction of each ceiling, per client count."""
    by = {(r.name, r.clients): r for r in results}
    out: dict[str, float] = {}
    for clients in CLIENT_COUNTS:
        service = by[("checkout_release_via_service", clients)].ops_per_s
        for ceiling in ("checkout_release_raw_same_sql", "checkout_release_raw_minimal_sql"):
            out[f"service_over_{ceiling.removeprefix('checkout_release_')}_c{clients}"] = round(
                service / by[(ceiling, clients)].ops_per_s, 3
            )
        bare = by[("bare_grpc_round_trip", clients)]
        out[f"service_cycle_p50_minus_2x_bare_p50_ms_c{clients}"] = round(
            by[("checkout_release_via_service", clients)].p50_ms - 2 * bare.p50_ms, 3
        )
    return out


async def _prepare(server_url: str) -> str:
    name = f"paperclip_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = _database_in(server_url, name)
    await migrate(url)
    return url


async def _drop(server_url: str, url: str) -> None:
    name = url.partition("?")[0].rsplit("/", 1)[1]
    conn = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def main() -> int:
    external = os.environ.get("PAPERCLIP_BENCH_DATABASE_URL")
    with tempfile.TemporaryDirectory(prefix="paperclip-bench-") as tmp:
        home = Path(tmp)
        pg = None if external else EmbeddedPostgres.start(home / "pgdata", database="postgres")
        server_url = normalize_database_url(external) if external else pg.url  # type: ignore[union-attr]
        database_url = asyncio.run(_prepare(server_url))
        proc, address = start_issue_service(database_url, home)
        try:
            print(
                f"checkout/release cycle, {SECONDS:.0f} s per workload "
                f"({os.cpu_count()} cores, database {'external' if external else 'embedded'})"
            )
            results = asyncio.run(measure(database_url, address))
        finally:
            proc.terminate()
            proc.wait(timeout=15)
            asyncio.run(_drop(server_url, database_url))
            if pg is not None:
                pg.stop()
    summary = {"results": [r.as_dict() for r in results], "ratios": ratios(results)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "issue_cycle.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary["ratios"], indent=2))
    print(f"written to {RESULTS / 'issue_cycle.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
