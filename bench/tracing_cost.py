"""``python -m bench.tracing_cost``: what tracing costs when it is off, next to the same
paths with no tracing code at all.

With tracing off, servers and channels get no tracing interceptor (checked here), so
what is left in the hot paths is a check of ``tracing.ENABLED`` in two places, each
timed with the check present and bypassed (the code as it was before tracing), in
alternating rounds:

- **the server interceptor path**: the interceptor chain of every service around a
  unary behavior that does nothing, called directly with a stand-in context (no
  sockets: the share of the check is as large as it can be). The request id comes in
  ``x-request-id``, as behind the gateway.
- **a unit of work** running one ``SELECT 1`` on a real PostgreSQL (embedded in a
  temporary directory unless ``PAPERCLIP_BENCH_DATABASE_URL`` names a server).

Prints the time per operation of each (the fastest round, and the median) and the ratio
of the fastest rounds (aim: under 1.03). On a busy machine those ratios move by a few
per cent either way, so each check is also timed on its own (``timeit``, less an empty
statement) and given as a share of the fastest operation it sits in. Writes
``bench/results/tracing_cost.json``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import statistics
import tempfile
import time
import timeit
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from sqlalchemy.util import greenlet_spawn

from common import interceptors, tracing
from common.actor import Actor, ActorType
from common.database_url import normalize_database_url
from common.db import Database
from common.errors import PaperclipError
from common.request_context import REQUEST_ID
from common.sql import Tx, sql
from local_suite.embedded_pg import EmbeddedPostgres

RESULTS = Path(__file__).with_name("results")
#: Many short rounds, alternating: the fastest round of each is the one least disturbed
#: by whatever else the machine runs.
CALL_ROUNDS = 301
CALLS_PER_ROUND = 1_000
UNIT_ROUNDS = 101
UNITS_PER_ROUND = 100
AIM = 1.03
_ACTOR = Actor(type=ActorType.SERVICE, service="bench")
_SELECT_1 = sql("SELECT 1")


class _Auth:
    async def authenticate(self, metadata: Mapping[str, str]) -> Actor:
        return _ACTOR


class _Context:
    """The parts of a servicer context the interceptor chain uses on success."""

    def __init__(self) -> None:
        self._metadata = (("x-request-id", uuid.uuid4().hex),)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def set_trailing_metadata(self, metadata: object) -> None:
        """Dropped: nothing reads a benchmarked call's trailing metadata."""


def _bare_call_init(self: Any, method: str, metadata: Mapping[str, str]) -> None:
    """``interceptors._Call.__init__`` without the tracing check."""
    self.method = method
    self.started = time.perf_counter()
    self.code = grpc.StatusCode.OK
    self.request_id = metadata.get(interceptors.REQUEST_ID_HEADER) or uuid.uuid4().hex
    REQUEST_ID.set(self.request_id)


async def _handler() -> Callable[[Any, Any], Awaitable[Any]]:
    async def behavior(request: Any, context: Any) -> Any:
        return request

    async def continuation(details: Any) -> Any:
        return grpc.unary_unary_rpc_method_handler(behavior)

    class _Details(grpc.HandlerCallDetails):
        method = "/paperclip.bench.v1.Bench/Noop"
        invocation_metadata = ()

    chain = interceptors.ServiceInterceptor(_Auth())
    wrapped: Any = await chain.intercept_service(continuation, _Details())
    handler: Callable[[Any, Any], Awaitable[Any]] = wrapped.unary_unary
    return handler


async def _time_calls(handler: Callable[[Any, Any], Awaitable[Any]]) -> float:
    context = _Context()
    gc.disable()  # a collection lands in whichever round it falls in
    try:
        started = time.perf_counter()
        for _ in range(CALLS_PER_ROUND):
            await handler(b"", context)
        return (time.perf_counter() - started) / CALLS_PER_ROUND
    finally:
        gc.enable()


async def interceptor_path() -> tuple[list[float], list[float]]:
    """Per-call seconds of each round: (check present, check bypassed)."""
    handler = await _handler()
    traced_init = interceptors._Call.__init__
    present: list[float] = []
    bypassed: list[float] = []
    await _time_calls(handler)  # warm-up
    try:
        for _ in range(CALL_ROUNDS):
            interceptors._Call.__init__ = traced_init  # type: ignore[method-assign]
            present.append(await _time_calls(handler))
            interceptors._Call.__init__ = _bare_call_init  # type: ignore[method-assign]
            bypassed.append(await _time_calls(handler))
    finally:
        interceptors._Call.__init__ = traced_init  # type: ignore[method-assign]
    return present, bypassed


@asynccontextmanager
async def _bare_unit_of_work(db: Database) -> AsyncIterator[Tx]:
    """``Database.unit_of_work`` without the tracing check (errors not translated)."""
    pooled = await db._checkout()
    driver: asyncpg.Connection = pooled.driver_connection  # type: ignore[assignment]
    reusable = False
    try:
        async with driver.transaction():
            tx = Tx(driver)
            yield tx
            await tx.flush()
        reusable = True
    except (asyncpg.PostgresError, PaperclipError):
        reusable = not (driver.is_closed() or driver.is_in_transaction())
        raise
    finally:
        if reusable:
            await greenlet_spawn(pooled.close)
        else:
            await greenlet_spawn(pooled.invalidate)


async def _time_units(open_unit: Callable[[], Any]) -> float:
    started = time.perf_counter()
    for _ in range(UNITS_PER_ROUND):
        async with open_unit() as tx:
            await tx.fetchval(_SELECT_1)
    return (time.perf_counter() - started) / UNITS_PER_ROUND


async def unit_of_work(database_url: str) -> tuple[list[float], list[float]]:
    """Per-unit seconds of each round: (check present, check bypassed)."""
    db = Database(database_url, pool_size=1, max_overflow=0, name="bench-tracing")
    present: list[float] = []
    bypassed: list[float] = []
    try:
        await _time_units(db.unit_of_work)  # warm-up: the pool's connection
        for _ in range(UNIT_ROUNDS):
            present.append(await _time_units(db.unit_of_work))
            bypassed.append(await _time_units(lambda: _bare_unit_of_work(db)))
    finally:
        await db.dispose()
    return present, bypassed


def _report(name: str, present: list[float], bypassed: list[float]) -> dict[str, float]:
    off, bare = min(present), min(bypassed)
    ratio = off / bare
    verdict = "ok" if ratio < AIM else "over the aim"
    print(
        f"  {name:26s} off {off * 1e6:8.2f} us (median {statistics.median(present) * 1e6:8.2f})"
        f"  no tracing code {bare * 1e6:8.2f} us (median {statistics.median(bypassed) * 1e6:8.2f})"
        f"  ratio {ratio:.3f} ({verdict}: aim < {AIM})",
        flush=True,
    )
    return {
        "off_us": off * 1e6,
        "no_tracing_code_us": bare * 1e6,
        "off_median_us": statistics.median(present) * 1e6,
        "no_tracing_code_median_us": statistics.median(bypassed) * 1e6,
        "ratio": ratio,
    }


def _check_seconds(statement: str, bare: str, names: dict[str, Any]) -> float:
    """Seconds per evaluation of ``statement`` beyond ``bare`` (fastest of 11 repeats)."""
    number = 1_000_000
    timed = min(timeit.repeat(statement, globals=names, number=number, repeat=11))
    empty = min(timeit.repeat(bare, globals=names, number=number, repeat=11))
    return max(0.0, timed - empty) / number


def _report_check(name: str, seconds: float, operation: dict[str, float]) -> dict[str, float]:
    share = seconds * 1e6 / operation["no_tracing_code_us"]
    print(f"  the check in the {name:14s} {seconds * 1e9:6.1f} ns = {share:.3%} of it", flush=True)
    return {"check_ns": seconds * 1e9, "share": share}


async def measure(database_url: str) -> dict[str, dict[str, float]]:
    """Both measurements, printed and returned."""
    assert not tracing.ENABLED, "tracing must be off for this measurement"
    assert tracing.server_interceptors() == () and tracing.client_interceptors() == ()
    print("tracing turned off, against no tracing code (fastest of alternating rounds):")
    results = {"interceptor_path": _report("server interceptor path", *await interceptor_path())}
    results["unit_of_work"] = _report("unit of work (SELECT 1)", *await unit_of_work(database_url))
    names: dict[str, Any] = {"tracing": tracing, "metadata": {"x-request-id": "r"}, "d": object()}
    call_check = _check_seconds(
        "(tracing.ENABLED and tracing.current_trace_id()) or metadata.get('x-request-id')",
        "metadata.get('x-request-id')",
        names,
    )
    unit_check = _check_seconds("tracing.sql_connection(d) if tracing.ENABLED else d", "d", names)
    results["interceptor_check"] = _report_check(
        "interceptor", call_check, results["interceptor_path"]
    )
    results["unit_of_work_check"] = _report_check(
        "unit of work", unit_check, results["unit_of_work"]
    )
    return results


def main() -> None:
    external = os.environ.get("PAPERCLIP_BENCH_DATABASE_URL")
    with tempfile.TemporaryDirectory(prefix="paperclip-bench-tracing-") as home:
        if external:
            results = asyncio.run(measure(normalize_database_url(external)))
        else:
            pg = EmbeddedPostgres.start(Path(home) / "pgdata", database="postgres")
            try:
                results = asyncio.run(measure(pg.url))
            finally:
                pg.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tracing_cost.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
