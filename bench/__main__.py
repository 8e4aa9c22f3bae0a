"""``python -m bench``: the issue service's checkout/release cycle at 1 and 16 clients,
directly and through the gateway, next to a bare gRPC round trip and raw-SQL ceilings
measured in the same run, with the statements per cycle of the service and of each
ceiling (``bench.cycle_statements``), plus the gateway's own overhead per call at one
client; then
the run service (``bench.run_cycle``): wake -> child started latency next to a bare
spawn of the same program, sustained runs per second, and the ReapOrphanedRuns and
ReconcileStrandedIssues passes over 100,000 finished runs and 10,000 issues; then the
workspace service (``bench.workspace_cycle``): a runtime service's start-to-ready latency
next to the same server started bare, and jobs writing 10 MiB each next to the same
command run bare, with the service's RSS sampled throughout.

Uses an embedded PostgreSQL in a temporary directory unless PAPERCLIP_BENCH_DATABASE_URL
names a server (a fresh database is created on it and dropped afterwards). The issue
service, the run service, the workspace service and the gateway run as processes, as
``make run`` starts them. Prints tables and writes ``bench/results/issue_cycle.json``
(the run service's figures under its ``runs`` key, the workspace service's under
``workspaces``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from bench import cli_startup, replicas, retention, run_cycle, tracing_cost, workspace_cycle
from bench.bench_database import bench_database
from bench.cycle_statements import statements_per_cycle
from bench.gateway_cycle import (
    aims,
    gateway_cycle,
    gateway_ratios,
    get_company_direct,
    get_company_via_gateway,
)
from bench.issue_cycle import (
    bare_round_trip,
    checkout_aims,
    grpc_cycle,
    raw_cycle,
    seed,
    statement_ratios,
)
from bench.processes import JWT_SECRET, KEY, service_process, wait_serving
from bench.stats import Operation, Result, run_load
from common.database_url import asyncpg_dsn

CLIENT_COUNTS = (1, 16)
SECONDS = float(os.environ.get("PAPERCLIP_BENCH_SECONDS", "5"))
RESULTS = Path(__file__).with_name("results")


def _print_result(result: Result) -> None:
    print(
        f"  {result.name:36s} c={result.clients:<3d} {result.ops_per_s:>9.1f} ops/s "
        f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms",
        flush=True,
    )


async def measure(database_url: str, address: str, gateway: str) -> list[Result]:
    """Every workload at every client count, one after the other."""
    results: list[Result] = []
    dsn = asyncpg_dsn(database_url)
    pool = await asyncpg.create_pool(dsn, min_size=16, max_size=16)
    channel = grpc.aio.insecure_channel(address)
    public = grpc.aio.insecure_channel(gateway)
    try:
        for clients in CLIENT_COUNTS:
            async with pool.acquire() as conn:
                seats = await seed(conn, clients)  # type: ignore[arg-type]
                # The seats' runs are 'running' without a supervisor: the run service's
                # recovery would end them process_lost (and their tokens with them).
                await run_cycle.hold_runs(conn, [s.run_id for s in seats])  # type: ignore[arg-type]
            workloads: list[tuple[str, Operation]] = [
                ("bare_grpc_round_trip", bare_round_trip(channel)),
            ]
            if clients == 1:
                # The gateway's overhead per call, each figure next to its direct twin.
                workloads += [
                    ("bare_grpc_round_trip_via_gateway", bare_round_trip(public)),
                    ("get_company_direct", get_company_direct(channel, seats[0], KEY)),
                    (
                        "get_company_via_gateway",
                        get_company_via_gateway(public, seats[0], JWT_SECRET),
                    ),
                ]
            workloads += [
                ("checkout_release_via_service", grpc_cycle(channel, seats, KEY)),
                ("checkout_release_via_gateway", gateway_cycle(public, seats, JWT_SECRET)),
                ("checkout_release_raw_same_sql", raw_cycle(pool, seats, minimal=False)),
                ("checkout_release_raw_minimal_sql", raw_cycle(pool, seats, minimal=True)),
            ]
            for name, operation in workloads:
                result = await run_load(name, operation, clients=clients, seconds=SECONDS)
                results.append(result)
                _print_result(result)
    finally:
        await public.close()
        await channel.close()
        await pool.close()
    return results


def ratios(results: list[Result], statements: dict[str, float]) -> dict[str, float]:
    """Service throughput as a fraction of each ceiling, per client count, the
    statements per cycle (``bench.issue_cycle.statement_ratios``), then the gateway's
    figures (``bench.gateway_cycle.gateway_ratios``)."""
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
    return {**out, **statement_ratios(statements), **gateway_ratios(results)}


@dataclass
class Sections:
    """What each section of one bench run measured."""

    results: list[Result]
    statements: dict[str, float]
    runs: dict[str, Any]
    workspaces: dict[str, Any]
    replicas: dict[str, Any]
    retention: dict[str, Any]
    cli: dict[str, Any]


def _run(home: Path, external: str | None) -> Sections:
    """Start the database and the processes, measure, stop everything (in reverse)."""
    with ExitStack() as stack:
        database_url = stack.enter_context(bench_database(home, external))
        address = stack.enter_context(
            service_process(
                "issue_service",
                database_url,
                home,
                {"PAPERCLIP_ISSUE_SERVICE_ADDR": "127.0.0.1:0"},
            )
        )
        # The gateway routes to the workspace service as well (it refuses to start without
        # it); the workspace section at the end measures this same process.
        workspaces = stack.enter_context(
            service_process(
                "workspace_service",
                database_url,
                home,
                {"PAPERCLIP_WORKSPACE_SERVICE_ADDR": "127.0.0.1:0"},
            )
        )
        # The checkout workloads' run service does not reach the issue service (as
        # before): the wakes its outbox consumer makes of the bench's checkouts would run
        # and take the seats' issue locks. It is stopped before the run-service workloads,
        # which get their own, wired to the issue service.
        first_runs = stack.enter_context(ExitStack())
        runs = first_runs.enter_context(
            service_process(
                "run_service", database_url, home, {"PAPERCLIP_RUN_SERVICE_ADDR": "127.0.0.1:0"}
            )
        )
        gateway = stack.enter_context(
            service_process(
                "gateway",
                database_url,
                home,
                {
                    "PAPERCLIP_ISSUE_SERVICE_ADDR": address,
                    "PAPERCLIP_RUN_SERVICE_ADDR": runs,
                    "PAPERCLIP_WORKSPACE_SERVICE_ADDR": workspaces,
                    "PAPERCLIP_GATEWAY_ADDR": "127.0.0.1:0",
                },
            )
        )
        asyncio.run(wait_serving(gateway))
        print(
            f"checkout/release cycle, {SECONDS:g} s per workload "
            f"({os.cpu_count()} cores, database {'external' if external else 'embedded'}; "
            "client, services, gateway and database share the machine)"
        )
        results = asyncio.run(measure(database_url, address, gateway))
        print("\ncommand line: paperclip start-up", flush=True)
        cli_figures = cli_startup.measure_cli(database_url, gateway, dict(os.environ))
        statements = asyncio.run(statements_per_cycle(database_url))
        print("\nreplicas: two issue replicas against one, the gateway's hop", flush=True)
        replica_figures = replicas.measure_replicas(
            replicas.Backends(database_url, address, runs, workspaces),
            home,
            seconds=SECONDS,
            report=_print_result,
        )
        # Before the run service wired to the issue service starts: its outbox consumer
        # would turn the sweep section's checkouts into runs that take the seats' locks.
        print("\nretention: the sweep over 1M run events and 100k finished runs", flush=True)
        retention_figures = asyncio.run(retention.measure_retention(database_url, address, KEY))
        first_runs.close()
        runs = stack.enter_context(
            service_process(
                "run_service",
                database_url,
                home,
                {
                    "PAPERCLIP_RUN_SERVICE_ADDR": "127.0.0.1:0",
                    # Issue runs take the issue's execution lock there; runs release locks.
                    "PAPERCLIP_ISSUE_SERVICE_ADDR": address,
                    # Ended runs release their environment leases there, as in `make run`.
                    "PAPERCLIP_WORKSPACE_SERVICE_ADDR": workspaces,
                },
            )
        )
        print("\nrun service: wake -> started, runs per second, recovery sweeps", flush=True)
        runs_figures = asyncio.run(run_cycle.measure_runs(database_url, runs, address, home, KEY))
        print("\nworkspace service: start-to-ready, 10 MiB jobs, memory", flush=True)
        workspaces_figures = asyncio.run(
            workspace_cycle.measure_workspaces(database_url, workspaces, home, KEY)
        )
        return Sections(
            results,
            statements,
            runs_figures,
            workspaces_figures,
            replica_figures,
            retention_figures,
            cli_figures,
        )


def _table(results: list[Result]) -> str:
    header = f"{'workload':36s} {'clients':>7s} {'ops/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s}"
    rows = [
        f"{r.name:36s} {r.clients:>7d} {r.ops_per_s:>9.1f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f}"
        for r in sorted(results, key=lambda r: (r.clients, r.name))
    ]
    return "\n".join([header, "-" * len(header), *rows])


def main() -> int:
    external = os.environ.get("PAPERCLIP_BENCH_DATABASE_URL")
    with tempfile.TemporaryDirectory(prefix="paperclip-bench-") as tmp:
        measured = _run(Path(tmp), external)
    results = measured.results
    runs_figures, workspaces_figures = measured.runs, measured.workspaces
    replica_figures = measured.replicas
    figures = ratios(results, measured.statements)
    summary = {
        "results": [r.as_dict() for r in results],
        "ratios": figures,
        "runs": runs_figures,
        "workspaces": workspaces_figures,
        "replicas": replica_figures,
        "retention": measured.retention,
        "cli": measured.cli,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "issue_cycle.json").write_text(json.dumps(summary, indent=2))
    print()
    print(_table(results))
    print()
    print(json.dumps(figures, indent=2))
    print("\n".join(checkout_aims(figures)))
    print("\n".join(aims(figures)))
    print()
    print(run_cycle.table(runs_figures))
    print(json.dumps(runs_figures["figures"], indent=2))
    print("\n".join(run_cycle.aims(runs_figures)))
    print()
    print(replicas.table(replica_figures))
    print(json.dumps(replica_figures["figures"], indent=2))
    print("\n".join(replicas.aims(replica_figures)))
    print()
    print(workspace_cycle.table(workspaces_figures))
    print(json.dumps(workspaces_figures["figures"], indent=2))
    print("\n".join(workspace_cycle.aims(workspaces_figures)))
    print()
    print(json.dumps(measured.cli, indent=2))
    print("\n".join(cli_startup.aims(measured.cli)))
    print()
    print(retention.table(measured.retention))
    print("\n".join(retention.aims(measured.retention)))
    print(f"written to {RESULTS / 'issue_cycle.json'}")
    print()
    tracing_cost.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
