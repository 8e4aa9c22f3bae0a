"""``make run``: the whole suite on one machine, in the foreground.

Starts embedded PostgreSQL under ``PAPERCLIP_HOME`` unless ``PAPERCLIP_DATABASE_URL`` is
set, applies the migrations, starts each service as a child process (in order, each told
the addresses of the ones before it), prints where everything listens and waits. Ctrl-C
or SIGTERM stops the services, then the database; so does the death of any service.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType

from sqlalchemy.exc import SQLAlchemyError

from common.config import Settings, load_settings
from common.database_url import normalize_database_url, redact_database_url
from common.db import Database
from common.errors import ConfigError
from common.log import configure_logging
from common.migrate import migrate
from gateway.local_admin import ensure_board_token
from local_suite.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError
from supervision import process_group
from supervision.file_lock import FileLock, LockHeldError
from supervision.process_group import Child, ChildFailedError, ProcessSpec, StartInterruptedError

logger = logging.getLogger("local_suite.launcher")

#: The suite, in start order: each service is given the addresses of those before it.
SERVICES: tuple[ProcessSpec, ...] = (
    ProcessSpec("issue_service", "PAPERCLIP_ISSUE_SERVICE_ADDR"),
    ProcessSpec("workspace_service", "PAPERCLIP_WORKSPACE_SERVICE_ADDR"),
    ProcessSpec("run_service", "PAPERCLIP_RUN_SERVICE_ADDR"),
    ProcessSpec("gateway", "PAPERCLIP_GATEWAY_ADDR"),
)
READY_TIMEOUT_S = 60.0
#: Longer than the services' own shutdown grace, so a clean stop is never cut short.
STOP_GRACE_S = 10.0
#: Each service serves its Prometheus metrics on a port of its own on this host.
METRICS_HOST = "127.0.0.1"

_TICK_S = 0.1


class LauncherError(RuntimeError):
    """The suite cannot start; the message says why and what to do."""


class StopSignal:
    """Records SIGINT/SIGTERM; the launcher polls it between steps and while serving."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = self.signum or signum

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived."""
        return self.signum is not None


def main() -> int:
    """Run the suite until stopped: 0 after a requested stop, 1 on any failure."""
    stop = StopSignal()
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"paperclip: configuration error: {exc}", file=sys.stderr)
        return 1
    configure_logging("launcher", settings.log_level)
    try:
        return _run(settings, stop)
    except StartInterruptedError:
        return 0
    except (LauncherError, EmbeddedPostgresError, ChildFailedError) as exc:
        print(f"paperclip: {exc}", file=sys.stderr)
        return 0 if stop.requested else 1
    except Exception:
        logger.exception("launcher failed")
        return 1


def _run(settings: Settings, stop: StopSignal) -> int:
    with ExitStack() as stack:
        stack.enter_context(_instance_lock(settings.home))
        url, database, embedded = stack.enter_context(_database(settings))
        _migrate(url, database)
        token_file = asyncio.run(_board_token(url, settings.home))
        children: list[Child] = []
        stack.callback(process_group.stop_all, children, grace=STOP_GRACE_S)
        metrics: dict[str, str] = {}
        _start_services(settings, url, children, stop, metrics)
        stack.enter_context(_suite_ready_file(settings, children, metrics))
        _print_banner(settings, database, children, token_file, metrics)
        status = _supervise(children, stop, DatabaseWatch(embedded))
    return status


def _migrate(url: str, database: str) -> None:
    logger.info("migrating", extra={"database": database})
    try:
        asyncio.run(migrate(url))
    except (OSError, SQLAlchemyError) as exc:
        logger.error("migration failed", exc_info=True)
        raise LauncherError(f"cannot migrate the database ({database}): {exc}") from exc


@contextmanager
def _instance_lock(home: Path) -> Iterator[None]:
    try:
        lock = FileLock.acquire(home / "launcher.lock")
    except LockHeldError as exc:
        raise LauncherError(
            f"another launcher (pid {exc.holder_pid}) already runs the suite in "
            f"PAPERCLIP_HOME={home}: stop it first, or set PAPERCLIP_HOME to another directory"
        ) from exc
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _database(settings: Settings) -> Iterator[tuple[str, str, EmbeddedPostgres | None]]:
    """Yield the SQLAlchemy URL of the suite's database, a description without secrets
    and the embedded server (None with an external database)."""
    if settings.database_url is not None:
        try:
            url = normalize_database_url(settings.database_url)
        except ValueError as exc:
            raise LauncherError(f"PAPERCLIP_DATABASE_URL: {exc}") from exc
        yield url, f"external, {redact_database_url(settings.database_url)}", None
        return
    server = EmbeddedPostgres.start(settings.home / "pgdata")
    try:
        yield server.url, f"embedded, data in {server.data_dir}", server
    finally:
        server.stop()


class DatabaseWatch:
    """Brings the embedded PostgreSQL back when it dies while the suite runs.

    The services keep running meanwhile (they answer UNAVAILABLE with reason
    ``DATABASE_UNAVAILABLE`` and report NOT_SERVING) and serve again on their own once
    it is back. A restart that fails (the dead server's processes still exiting) is
    retried every ``RETRY_S`` seconds; the outage is reported when it starts, when it
    ends, and every ``REPORT_EVERY`` failed attempts in between."""

    RETRY_S = 1.0
    REPORT_EVERY = 30

    def __init__(self, server: EmbeddedPostgres | None) -> None:
        self._server = server
        self._down_since: float | None = None
        self._next_try = 0.0
        self._failures = 0

    def check(self) -> None:
        """One look (cheap: a process check); a restart attempt when it is due."""
        server = self._server
        if server is None or server.alive():
            return
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            print("paperclip: the embedded PostgreSQL stopped; restarting it", file=sys.stderr)
            logger.error("embedded postgres died", extra={"data_dir": str(server.data_dir)})
        if now < self._next_try:
            return
        try:
            server.restart()
        except EmbeddedPostgresError as exc:
            self._failures += 1
            self._next_try = now + self.RETRY_S
            if self._failures % self.REPORT_EVERY == 1:
                logger.warning(
                    "embedded postgres restart failed; retrying",
                    extra={"attempts": self._failures, "error": str(exc)},
                )
            return
        down_s = now - self._down_since
        print(f"paperclip: the embedded PostgreSQL is back after {down_s:.1f} s", file=sys.stderr)
        logger.warning("embedded postgres back", extra={"down_s": round(down_s, 1)})
        self._down_since, self._failures, self._next_try = None, 0, 0.0


def _concrete(address: str) -> str:
    """``host:0`` with a free port picked now; any other address unchanged."""
    host, _, port = address.rpartition(":")
    if port != "0":
        return address
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return f"{host}:{probe.getsockname()[1]}"


def _start_services(
    settings: Settings,
    url: str,
    children: list[Child],
    stop: StopSignal,
    metrics: dict[str, str],
) -> None:
    """Start every service in order; ``metrics`` gets each one's metrics address."""
    # One metrics port is for one process; the services of one launcher would clash.
    inherited = {k: v for k, v in os.environ.items() if k != "PAPERCLIP_METRICS_ADDR"}
    env = {
        **inherited,
        "PAPERCLIP_HOME": str(settings.home),
        "PAPERCLIP_DATABASE_URL": url,
        "PAPERCLIP_INTERNAL_KEY": settings.internal_key.decode(),
        "PAPERCLIP_JWT_SECRET": settings.jwt_secret.decode(),
        # Agents are told the gateway's address before the gateway starts (it starts
        # last, routing to the others), so a port-0 gateway address is fixed here.
        "PAPERCLIP_GATEWAY_ADDR": _concrete(settings.gateway_addr),
    }
    run_dir = settings.home / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    for spec in SERVICES:
        if stop.requested:
            raise StartInterruptedError(f"stop requested before {spec.module} started")
        metrics_addr = _concrete(f"{METRICS_HOST}:0")
        metrics[spec.module] = metrics_addr
        child = process_group.spawn(
            spec, {**env, "PAPERCLIP_METRICS_ADDR": metrics_addr}, run_dir / f"{spec.module}.json"
        )
        children.append(child)
        addr = process_group.wait_ready(
            child, timeout=READY_TIMEOUT_S, stop_requested=lambda: stop.requested
        )
        env[spec.addr_env] = addr


@contextmanager
def _suite_ready_file(
    settings: Settings, children: list[Child], metrics: dict[str, str]
) -> Iterator[None]:
    """Announce the whole suite in ``PAPERCLIP_READY_FILE``, as a service announces itself."""
    path = settings.ready_file
    if path is None:
        yield
        return
    services = {child.spec.module: child.addr for child in children}
    body = {
        "service": "launcher",
        "addr": children[-1].addr,
        "pid": os.getpid(),
        "metrics": metrics,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**body, "services": services}))
    tmp.replace(path)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


async def _board_token(url: str, home: Path) -> Path:
    """The local instance-admin key file (created on the first start)."""
    db = Database(url, pool_size=1, max_overflow=0, name="launcher")
    try:
        return await ensure_board_token(db, home)
    finally:
        await db.dispose()


def _grpcurl() -> str:
    bundled = Path(sys.executable).with_name("grpcurl")
    return str(bundled) if bundled.exists() else "grpcurl"


def _print_banner(
    settings: Settings,
    database: str,
    children: list[Child],
    token_file: Path,
    metrics: dict[str, str],
) -> None:
    rows = [
        (child.spec.module, f"{child.addr}  (metrics http://{metrics[child.spec.module]}/metrics)")
        for child in children
    ]
    rows += [
        ("database", database),
        ("PAPERCLIP_HOME", str(settings.home)),
        ("board token", str(token_file)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["", "Paperclip Core is running:"]
    lines += [f"  {name.ljust(width)}  {value}" for name, value in rows]
    gateway = next(child.addr for child in children if child.spec.module == "gateway")
    lines += [
        "",
        "Try it (the board token is an instance-admin key):",
        f'  {_grpcurl()} -plaintext -H "authorization: Bearer $(cat {token_file})" {gateway} list',
        "",
    ]
    lines += ["Ctrl-C to stop.", ""]
    print("\n".join(lines), flush=True)
    logger.info(
        "suite ready",
        extra={"services": {c.spec.module: c.addr for c in children}, "metrics": metrics},
    )


def _supervise(children: list[Child], stop: StopSignal, database: DatabaseWatch) -> int:
    while not stop.requested:
        crashed = process_group.first_exited(children)
        if crashed is not None:
            status = process_group.describe_exit(crashed.process.returncode)
            print(f"paperclip: {crashed.spec.module} {status}; stopping", file=sys.stderr)
            return 1
        database.check()
        time.sleep(_TICK_S)
    logger.info("stopping", extra={"signal": stop.signum})
    return 0


if __name__ == "__main__":
    sys.exit(main())
