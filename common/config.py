"""Configuration read from environment variables (API.md, "Operations contract").

Every process of the suite reads the same variables; nothing is read from files except
the generated secrets under ``PAPERCLIP_HOME`` in local mode.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from paperclip_client.errors import ConfigError

DEFAULT_GATEWAY_ADDR = "127.0.0.1:50051"
DEFAULT_INTERNAL_ADDR = "127.0.0.1:0"
SECRETS_FILE = "secrets.json"
#: The longest wake-loop window ``PAPERCLIP_WAKE_LOOP_WINDOW_SECONDS`` accepts (7 days).
WAKE_LOOP_WINDOW_MAX_SECONDS = 604_800


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a process of the suite is configured with."""

    home: Path
    database_url: str | None
    gateway_addr: str
    issue_service_addr: str
    run_service_addr: str
    workspace_service_addr: str
    internal_key: bytes
    jwt_secret: bytes
    db_pool_size: int
    db_max_overflow: int
    log_level: str
    ready_file: Path | None
    lock_sweep_seconds: float
    metrics_addr: str | None
    max_processes: int
    dispatch_poll_seconds: float
    #: How often the workspace service expires unrenewed leases and releases the
    #: leases of ended runs.
    lease_sweep_seconds: float
    #: How often the workspace service stops the services of closed issues' workspaces
    #: when no notification arrives.
    workspace_reap_seconds: float
    #: The wake-loop breaker: this many runs of one (agent, issue, wake reason) within
    #: ``wake_loop_window_seconds`` and no status change or board action stop further
    #: wakes of it (0: no breaker).
    wake_loop_runs: int = 10
    wake_loop_window_seconds: int = 1800
    #: A run still queued after this long ends failed (``queue_timeout``; 0: never).
    max_queued_seconds: int = 14_400
    #: The name of the machine (or pod) this process runs on: agent processes, runtime
    #: services and workspace directories belong to it.
    host: str = ""
    #: ``host:port`` at which other processes reach this one when it listens on a
    #: wildcard or a port picked at start (unset: the listen address).
    advertise_addr: str | None = None
    #: The OTLP gRPC endpoint spans are exported to (``http://collector:4317``); unset:
    #: no tracing.
    otlp_endpoint: str | None = None
    #: Retention (README "Retention"): seconds between two sweeps of each service
    #: (0: no sweep), rows per DELETE statement and the pause between two of them.
    retention_sweep_seconds: float = 300.0
    retention_batch_rows: int = 5000
    retention_batch_pause_seconds: float = 0.05
    #: Days a row is kept once it is no longer needed (0: kept for ever).
    retention_run_events_days: int = 14
    retention_runs_days: int = 30
    retention_skipped_wakes_days: int = 3
    retention_wakes_days: int = 30
    retention_wake_breakers_days: int = 30
    retention_activity_days: int = 90
    retention_issue_events_days: int = 1
    retention_workspace_operations_days: int = 30
    retention_leases_days: int = 7
    #: A runtime service's log is rotated once it exceeds this size (0: never), keeping
    #: this many rotated files, checked this often.
    retention_runtime_log_bytes: int = 10 * 1024 * 1024
    retention_runtime_log_files: int = 3
    retention_runtime_log_check_seconds: float = 2.0

    @property
    def embedded(self) -> bool:
        """True when the suite runs its own PostgreSQL under ``home``."""
        return self.database_url is None


def _int(env: Mapping[str, str], name: str, default: int, *, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def load_secrets(home: Path) -> dict[str, str]:
    """Read the generated secrets of a local instance, creating them (mode 0600) once."""
    path = home / SECRETS_FILE
    if path.exists():
        loaded: dict[str, str] = json.loads(path.read_text())
        return loaded
    home.mkdir(parents=True, exist_ok=True)
    values = {"internal_key": secrets.token_hex(32), "jwt_secret": secrets.token_hex(32)}
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(values, fh)
    try:
        os.link(tmp, path)
    except FileExistsError:
        # Another process of the same instance won the race: use its secrets.
        tmp.unlink()
        existing: dict[str, str] = json.loads(path.read_text())
        return existing
    tmp.unlink()
    return values


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from ``env`` (default: the process environment)."""
    env = os.environ if env is None else env
    home = Path(env.get("PAPERCLIP_HOME") or ".paperclip").expanduser().resolve()
    internal_key = env.get("PAPERCLIP_INTERNAL_KEY", "")
    jwt_secret = env.get("PAPERCLIP_JWT_SECRET", "")
    if not internal_key or not jwt_secret:
        generated = load_secrets(home)
        internal_key = internal_key or generated["internal_key"]
        jwt_secret = jwt_secret or generated["jwt_secret"]
    ready = env.get("PAPERCLIP_READY_FILE")
    return Settings(
        home=home,
        database_url=env.get("PAPERCLIP_DATABASE_URL") or None,
        gateway_addr=env.get("PAPERCLIP_GATEWAY_ADDR") or DEFAULT_GATEWAY_ADDR,
        issue_service_addr=env.get("PAPERCLIP_ISSUE_SERVICE_ADDR") or DEFAULT_INTERNAL_ADDR,
        run_service_addr=env.get("PAPERCLIP_RUN_SERVICE_ADDR") or DEFAULT_INTERNAL_ADDR,
        workspace_service_addr=(
            env.get("PAPERCLIP_WORKSPACE_SERVICE_ADDR") or DEFAULT_INTERNAL_ADDR
        ),
        internal_key=internal_key.encode(),
        jwt_secret=jwt_secret.encode(),
        db_pool_size=_int(env, "PAPERCLIP_DB_POOL_SIZE", 10, low=1, high=200),
        db_max_overflow=_int(env, "PAPERCLIP_DB_MAX_OVERFLOW", 10, low=0, high=200),
        log_level=(env.get("PAPERCLIP_LOG_LEVEL") or "INFO").upper(),
        ready_file=Path(ready) if ready else None,
        metrics_addr=env.get("PAPERCLIP_METRICS_ADDR") or None,
        max_processes=_int(env, "PAPERCLIP_MAX_PROCESSES", 32, low=1, high=10_000),
        dispatch_poll_seconds=_int(env, "PAPERCLIP_DISPATCH_POLL_MS", 1000, low=50, high=60_000)
        / 1000,
        lock_sweep_seconds=float(_int(env, "PAPERCLIP_LOCK_SWEEP_SECONDS", 30, low=1, high=3600)),
        lease_sweep_seconds=float(_int(env, "PAPERCLIP_LEASE_SWEEP_SECONDS", 15, low=1, high=3600)),
        workspace_reap_seconds=float(
            _int(env, "PAPERCLIP_WORKSPACE_REAP_SECONDS", 30, low=1, high=3600)
        ),
        wake_loop_runs=_int(env, "PAPERCLIP_WAKE_LOOP_RUNS", 10, low=0, high=10_000),
        wake_loop_window_seconds=_int(
            env,
            "PAPERCLIP_WAKE_LOOP_WINDOW_SECONDS",
            1800,
            low=60,
            high=WAKE_LOOP_WINDOW_MAX_SECONDS,
        ),
        max_queued_seconds=_int(env, "PAPERCLIP_MAX_QUEUED_SECONDS", 14_400, low=0, high=2_592_000),
        host=(env.get("PAPERCLIP_HOST") or "").strip() or socket.gethostname(),
        advertise_addr=(env.get("PAPERCLIP_ADVERTISE_ADDR") or "").strip() or None,
        otlp_endpoint=(env.get("PAPERCLIP_OTLP_ENDPOINT") or "").strip() or None,
        retention_sweep_seconds=float(
            _int(env, "PAPERCLIP_RETENTION_SWEEP_SECONDS", 300, low=0, high=86_400)
        ),
        retention_batch_rows=_int(env, "PAPERCLIP_RETENTION_BATCH_ROWS", 5000, low=1, high=10**6),
        retention_batch_pause_seconds=(
            _int(env, "PAPERCLIP_RETENTION_BATCH_PAUSE_MS", 50, low=0, high=60_000) / 1000
        ),
        retention_run_events_days=_days(env, "PAPERCLIP_RETENTION_RUN_EVENTS_DAYS", 14),
        retention_runs_days=_days(env, "PAPERCLIP_RETENTION_RUNS_DAYS", 30),
        retention_skipped_wakes_days=_days(env, "PAPERCLIP_RETENTION_SKIPPED_WAKES_DAYS", 3),
        retention_wakes_days=_days(env, "PAPERCLIP_RETENTION_WAKES_DAYS", 30),
        retention_wake_breakers_days=_days(env, "PAPERCLIP_RETENTION_WAKE_BREAKERS_DAYS", 30),
        retention_activity_days=_days(env, "PAPERCLIP_RETENTION_ACTIVITY_DAYS", 90),
        retention_issue_events_days=_days(env, "PAPERCLIP_RETENTION_ISSUE_EVENTS_DAYS", 1),
        retention_workspace_operations_days=_days(
            env, "PAPERCLIP_RETENTION_WORKSPACE_OPERATIONS_DAYS", 30
        ),
        retention_leases_days=_days(env, "PAPERCLIP_RETENTION_LEASES_DAYS", 7),
        retention_runtime_log_bytes=_int(
            env, "PAPERCLIP_RETENTION_RUNTIME_LOG_BYTES", 10 * 1024 * 1024, low=0, high=1 << 40
        ),
        retention_runtime_log_files=_int(
            env, "PAPERCLIP_RETENTION_RUNTIME_LOG_FILES", 3, low=0, high=100
        ),
        retention_runtime_log_check_seconds=(
            _int(env, "PAPERCLIP_RETENTION_RUNTIME_LOG_CHECK_MS", 2000, low=50, high=3_600_000)
            / 1000
        ),
    )


def _days(env: Mapping[str, str], name: str, default: int) -> int:
    """A retention horizon in days (0: kept for ever)."""
    return _int(env, name, default, low=0, high=36_500)
