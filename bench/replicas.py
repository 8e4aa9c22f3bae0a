"""Past one machine: the checkout cycle through the gateway against two issue-service
replicas versus one, and what the gateway's hop costs next to the least a Python gRPC
proxy hop costs, measured in the same run.

- ``checkout_release_via_gateway_1_replica`` / ``_2_replicas`` at 32 clients: two
  gateways on the same backends, one naming issue replica A, the other A and B
  (round-robin over both). The machine's CPU use during each is reported: with every
  process on one machine, the cores are shared by the replicas, the gateway, the
  client and PostgreSQL, so a second replica helps only as far as cores are idle.
- At one client, ``GetCompany`` three ways: straight to the issue service (signed
  actor), through ``bench.passthrough_proxy`` (the floor: bytes forwarded, nothing
  else) and through the gateway (run token). The gateway's added p50 is its figure
  minus the direct one, next to the floor's; the gateway's and the floor proxy's CPU
  time per call are their processes' user+system time over the workload divided by
  its calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil

from bench import run_cycle
from bench.gateway_cycle import gateway_cycle, get_company_direct, get_company_via_gateway
from bench.issue_cycle import seed
from bench.processes import JWT_SECRET, KEY, pid_of, service_process, wait_serving
from bench.stats import Result, run_load
from common.database_url import asyncpg_dsn

CLIENTS = 32
#: The extra processes of this section share the database server's connections (100 by
#: default) with the bench's others: replica B gets what one of 32 clients' halves needs.
SMALL_POOL = {"PAPERCLIP_DB_POOL_SIZE": "16", "PAPERCLIP_DB_MAX_OVERFLOW": "0"}
#: What issue 9 aims at; the bench reports whether a run met it, it does not enforce it.
AIM_GATEWAY_ADDED_P50_MS = 0.5


@dataclass(frozen=True)
class Backends:
    """The bench's running services: issue replica A, the run and workspace services."""

    database_url: str
    issue_a: str
    runs: str
    workspaces: str


@dataclass(frozen=True)
class _Setup:
    database_url: str
    issue_a: str
    gateways: dict[str, str]
    floor: str
    pids: dict[str, int]


def measure_replicas(
    backends: Backends, home: Path, *, seconds: float, report: Callable[[Result], None]
) -> dict[str, Any]:
    """Start issue replica B, a gateway per replica count and the floor proxy; measure."""
    database_url, issue_a = backends.database_url, backends.issue_a
    runs, workspaces = backends.runs, backends.workspaces
    with ExitStack() as stack:
        homes = {name: home / name for name in ("replica-b", "one", "two", "floor")}
        for directory in homes.values():
            directory.mkdir(exist_ok=True)
        issue_b = stack.enter_context(
            service_process(
                "issue_service",
                database_url,
                homes["replica-b"],
                {"PAPERCLIP_ISSUE_SERVICE_ADDR": "127.0.0.1:0", **SMALL_POOL},
            )
        )
        gateways = {}
        for name, issue in (("one", issue_a), ("two", f"{issue_a},{issue_b}")):
            gateways[name] = stack.enter_context(
                service_process(
                    "gateway",
                    database_url,
                    homes[name],
                    {
                        "PAPERCLIP_ISSUE_SERVICE_ADDR": issue,
                        "PAPERCLIP_RUN_SERVICE_ADDR": runs,
                        "PAPERCLIP_WORKSPACE_SERVICE_ADDR": workspaces,
                        "PAPERCLIP_GATEWAY_ADDR": "127.0.0.1:0",
                        "PAPERCLIP_DB_POOL_SIZE": "4",
                        "PAPERCLIP_DB_MAX_OVERFLOW": "0",
                    },
                )
            )
            asyncio.run(wait_serving(gateways[name]))
        floor = stack.enter_context(
            service_process(
                "bench.passthrough_proxy",
                database_url,
                homes["floor"],
                {"PAPERCLIP_PROXY_TARGET": issue_a, "PAPERCLIP_PROXY_ADDR": "127.0.0.1:0"},
            )
        )
        pids = {
            "gateway": pid_of(homes["one"], "gateway"),
            "floor": pid_of(homes["floor"], "bench.passthrough_proxy"),
        }
        setup = _Setup(database_url, issue_a, gateways, floor, pids)
        return asyncio.run(_measure(setup, seconds, report))


async def _measure(
    setup: _Setup, seconds: float, report: Callable[[Result], None]
) -> dict[str, Any]:
    database_url, issue_a, pids = setup.database_url, setup.issue_a, setup.pids
    pool = await asyncpg.create_pool(asyncpg_dsn(database_url), min_size=1, max_size=2)
    channels = {
        "direct": grpc.aio.insecure_channel(issue_a),
        "floor": grpc.aio.insecure_channel(setup.floor),
        **{name: grpc.aio.insecure_channel(address) for name, address in setup.gateways.items()},
    }
    results: list[Result] = []
    cpu: dict[str, float] = {}
    try:
        async with pool.acquire() as conn:
            seats = await seed(conn, CLIENTS)  # type: ignore[arg-type]
            await run_cycle.hold_runs(conn, [s.run_id for s in seats])  # type: ignore[arg-type]

        async def timed(name: str, clients: int, operation: Any) -> Result:
            result = await run_load(name, operation, clients=clients, seconds=seconds)
            results.append(result)
            report(result)
            return result

        seat = seats[0]
        direct = await timed(
            "get_company_direct", 1, get_company_direct(channels["direct"], seat, KEY)
        )
        proxied, floor_cpu = await _with_cpu(
            pids["floor"],
            timed(
                "get_company_via_floor_proxy", 1, get_company_direct(channels["floor"], seat, KEY)
            ),
        )
        via_gateway, gateway_cpu = await _with_cpu(
            pids["gateway"],
            timed(
                "get_company_via_gateway",
                1,
                get_company_via_gateway(channels["one"], seat, JWT_SECRET),
            ),
        )
        cpu["floor_proxy_cpu_ms_per_call"] = round(floor_cpu * 1000 / max(1, proxied.ops), 3)
        cpu["gateway_cpu_ms_per_call"] = round(gateway_cpu * 1000 / max(1, via_gateway.ops), 3)

        machine: dict[str, float] = {}
        cycles: dict[str, Result] = {}
        for name, label in (("one", "1_replica"), ("two", "2_replicas")):
            psutil.cpu_percent()
            cycles[name] = await timed(
                f"checkout_release_via_gateway_{label}",
                CLIENTS,
                gateway_cycle(channels[name], seats, JWT_SECRET),
            )
            machine[f"machine_cpu_percent_{label}"] = psutil.cpu_percent()
    finally:
        for channel in channels.values():
            await channel.close()
        await pool.close()

    figures = {
        "gateway_added_p50_ms_c1": round(via_gateway.p50_ms - direct.p50_ms, 3),
        "floor_proxy_added_p50_ms_c1": round(proxied.p50_ms - direct.p50_ms, 3),
        **cpu,
        f"two_replicas_over_one_c{CLIENTS}": round(
            cycles["two"].ops_per_s / cycles["one"].ops_per_s, 3
        ),
        **machine,
        "cores": float(psutil.cpu_count() or 0),
    }
    return {"results": [r.as_dict() for r in results], "figures": figures}


async def _with_cpu(pid: int, work: Awaitable[Result]) -> tuple[Result, float]:
    """``work``'s result and the CPU seconds process ``pid`` spent meanwhile."""
    process = psutil.Process(pid)
    before = process.cpu_times()
    result = await work
    after = process.cpu_times()
    return result, (after.user - before.user) + (after.system - before.system)


def table(measured: dict[str, Any]) -> str:
    header = f"{'workload':40s} {'clients':>7s} {'ops/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s}"
    rows = [
        f"{r['name']:40s} {r['clients']:>7d} {r['ops_per_s']:>9.1f} "
        f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}"
        for r in measured["results"]
    ]
    return "\n".join([header, "-" * len(header), *rows])


def aims(measured: dict[str, Any]) -> list[str]:
    """One line per figure of issue 9, saying whether this run met the aim."""
    f = measured["figures"]
    added = f["gateway_added_p50_ms_c1"]
    met = "met" if added <= AIM_GATEWAY_ADDED_P50_MS else "NOT met"
    return [
        f"aim: gateway adds <= {AIM_GATEWAY_ADDED_P50_MS:g} ms at p50, 1 client: {added:.3f} ms, "
        f"{met} (the floor of a bare Python gRPC proxy hop in this run: "
        f"{f['floor_proxy_added_p50_ms_c1']:.3f} ms)",
        f"gateway CPU per call: {f['gateway_cpu_ms_per_call']:.3f} ms "
        f"(floor proxy: {f['floor_proxy_cpu_ms_per_call']:.3f} ms)",
        f"checkout cycle at {CLIENTS} clients, 2 issue replicas over 1: "
        f"x{f[f'two_replicas_over_one_c{CLIENTS}']:.2f} (machine CPU "
        f"{f['machine_cpu_percent_1_replica']:.0f}% -> {f['machine_cpu_percent_2_replicas']:.0f}%"
        f" of {f['cores']:.0f} cores: a second replica on the same cores helps only while "
        "they are idle)",
    ]
