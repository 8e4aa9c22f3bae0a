"""Reading runs: GetRun, ListRuns, ListRunEvents and the WatchRun stream.

Reads are allowed to any actor with read access to the run's company. Lists are
AIP-132 pages with keyset cursors: runs newest first on (created_at, id), events in
``seq`` order. WatchRun replays the stored events page by page, then follows new ones:
one process-wide LISTEN connection on ``paperclip_run_events`` (the trigger on
``runs.run_events`` sends the run id) wakes the watchers of that run, and a 1 s
re-check covers lost notifications and a listener that is reconnecting. The stream
ends after the terminal lifecycle event, or once a terminal run has nothing left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from common.actor import Actor
from common.authz import require_company_access
from common.database_url import asyncpg_dsn
from common.db import Database
from common.errors import NotFound, invalid
from common.pagination import parse_page
from common.sql import Row, Tx, probe
from common.validation import Violations, collect_uuid
from paperclip.runs.v1 import run_messages_pb2 as pb
from paperclip.runs.v1 import runs_pb2
from run_service import run_store
from run_service.foreign_reads import company_exists
from run_service.run_store import TERMINAL

logger = logging.getLogger(__name__)

#: The NOTIFY channel of new run events (payload: the run id).
EVENTS_CHANNEL = "paperclip_run_events"
#: Events read per query while replaying or following a run (bounded memory).
WATCH_BATCH = 200
#: How long a watcher sleeps without a notification before it looks again.
WATCH_RECHECK_S = 1.0
#: How long the shared listener stays connected after its last watcher left, and how
#: often it checks that its connection still answers.
LISTENER_LINGER_S = 30.0
LISTENER_PING_TIMEOUT_S = 5.0
#: Reconnect back-off of the shared listener.
LISTENER_BACKOFF_S = (0.1, 5.0)
LISTENER_APPLICATION_NAME = "paperclip_run_watch"


def run_not_found(run_id: str) -> NotFound:
    """The error for a run id that names no run."""
    return NotFound("run not found", reason="RUN_NOT_FOUND", metadata={"run_id": run_id})


def check_run_id(field_name: str, value: str) -> str:
    """The canonical form of a required run id (INVALID_ARGUMENT naming the field)."""
    v = Violations()
    canonical = collect_uuid(v, field_name, value, required=True)
    v.raise_if_any()
    assert canonical is not None
    return canonical


# --- GetRun ---------------------------------------------------------------------------


async def get_run(db: Database, actor: Actor, run_id: str) -> pb.Run:
    """One run, for any actor who may read its company."""
    canonical = check_run_id("run_id", run_id)
    async with db.unit_of_work() as tx:
        row = await run_store.get_run(tx, canonical)
    if row is None:
        raise run_not_found(canonical)
    require_company_access(actor, str(row["company_id"]), write=False)
    return run_store.run_to_proto(row)


# --- ListRuns -------------------------------------------------------------------------


async def list_runs(
    db: Database, actor: Actor, request: runs_pb2.ListRunsRequest
) -> runs_pb2.ListRunsResponse:
    """A page of a company's runs, newest first, optionally of one agent, one issue or
    some statuses (keyset on created_at DESC, id DESC)."""
    v = Violations()
    company_id = collect_uuid(v, "company_id", request.company_id, required=True)
    agent_id = collect_uuid(v, "agent_id", request.agent_id, required=False)
    issue_id = collect_uuid(v, "issue_id", request.issue_id, required=False)
    statuses: set[str] = set()
    for index, value in enumerate(request.statuses):
        status = run_store.RUN_STATUS_FROM_PROTO.get(value)
        if status is None:
            v.add(f"statuses[{index}]", "must be a known, specified RunStatus")
        else:
            statuses.add(status)
    if request.page_size < 0:
        v.add("page_size", "must not be negative")
    v.raise_if_any()
    assert company_id is not None
    require_company_access(actor, company_id, write=False)
    wanted = sorted(statuses)
    page = parse_page(
        request.page_size,
        request.page_token,
        company_id=company_id,
        agent_id=agent_id,
        issue_id=issue_id,
        statuses=wanted,
    )
    params: dict[str, Any] = {"company": company_id, "limit": page.fetch_limit}
    if agent_id:
        params["agent"] = agent_id
    if issue_id:
        params["issue"] = issue_id
    if wanted:
        params["statuses"] = wanted
    if page.cursor is not None:
        params["after_t"] = page.cursor_time("t")
        params["after_id"] = page.cursor_uuid("i")
    async with db.unit_of_work() as tx:
        if page.cursor is None and not await company_exists(tx, company_id):
            raise NotFound(
                "company not found",
                reason="COMPANY_NOT_FOUND",
                metadata={"company_id": company_id},
            )
        rows = await run_store.list_runs(tx, params)
    shown, token = page.finish(rows, _run_cursor)
    return runs_pb2.ListRunsResponse(
        runs=[run_store.run_to_proto(row) for row in shown], next_page_token=token
    )


def _run_cursor(row: Row) -> dict[str, Any]:
    created: datetime = row["created_at"]
    return {"t": created.isoformat(), "i": str(row["id"])}


# --- ListRunEvents --------------------------------------------------------------------


async def _authorized_run(tx: Tx, actor: Actor, run_id: str) -> Row:
    """(company_id, status) of a run the actor may read; NOT_FOUND when missing."""
    row = await run_store.run_status(tx, run_id)
    if row is None:
        raise run_not_found(run_id)
    require_company_access(actor, str(row["company_id"]), write=False)
    return row


async def list_run_events(
    db: Database, actor: Actor, request: runs_pb2.ListRunEventsRequest
) -> runs_pb2.ListRunEventsResponse:
    """A page of a run's events with ``seq > after_seq``, in order (keyset on seq)."""
    v = Violations()
    run_id = collect_uuid(v, "run_id", request.run_id, required=True)
    if request.after_seq < 0:
        v.add("after_seq", "must not be negative")
    if request.page_size < 0:
        v.add("page_size", "must not be negative")
    v.raise_if_any()
    assert run_id is not None
    page = parse_page(
        request.page_size, request.page_token, run_id=run_id, after_seq=request.after_seq
    )
    after = request.after_seq
    if page.cursor is not None:
        after = page.cursor_int("s")
        if after < request.after_seq:
            raise invalid("page_token", "is not a token this service issued")
    async with db.unit_of_work() as tx:
        await _authorized_run(tx, actor, run_id)
        rows = await run_store.events_after(tx, run_id, after, page.fetch_limit)
    shown, token = page.finish(rows, lambda row: {"s": int(row["seq"])})
    return runs_pb2.ListRunEventsResponse(
        events=[run_store.event_to_proto(row) for row in shown], next_page_token=token
    )


# --- WatchRun -------------------------------------------------------------------------


def is_terminal_event(row: Row) -> bool:
    """Whether an event row is the run's terminal lifecycle event (``terminal: true``)."""
    if row["type"] != "lifecycle":
        return False
    payload = row["payload"]
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError:
            return False
    return isinstance(payload, dict) and payload.get("terminal") is True


async def watch_run(
    db: Database, actor: Actor, request: runs_pb2.WatchRunRequest
) -> AsyncIterator[pb.RunEvent]:
    """The run's events with ``seq > after_seq``: the stored ones first, then new ones
    as they are written; ends after the terminal event (or at once when the run is
    terminal and nothing is left). Authorization and validation happen before the
    first event, so a bad request fails the stream with its proper status."""
    v = Violations()
    run_id = collect_uuid(v, "run_id", request.run_id, required=True)
    if request.after_seq < 0:
        v.add("after_seq", "must not be negative")
    v.raise_if_any()
    assert run_id is not None
    async with db.unit_of_work() as tx:
        await _authorized_run(tx, actor, run_id)
    listener = shared_listener(db)
    subscription = listener.subscribe(run_id)
    last = request.after_seq
    try:
        while True:
            # Clear before reading: a notification that lands during the reads below
            # makes the next wait return at once instead of being lost.
            subscription.clear()
            async with db.unit_of_work() as tx:
                # Status first, then events: a run seen terminal here has all of its
                # events (written before or with the terminal status) in the read below.
                state = await run_store.run_status(tx, run_id)
                if state is None:
                    return  # deleted while watched: nothing more will come
                rows = await run_store.events_after(tx, run_id, last, WATCH_BATCH)
            for row in rows:
                last = int(row["seq"])
                yield run_store.event_to_proto(row)
                if is_terminal_event(row):
                    return
            if len(rows) == WATCH_BATCH:
                continue  # more stored events: keep paging before waiting
            if state["status"] in TERMINAL:
                return
            await subscription.wait(WATCH_RECHECK_S)
    finally:
        listener.unsubscribe(subscription)


@dataclass(eq=False)
class Subscription:
    """One watcher's interest in one run: an event set by notifications for it."""

    run_id: str
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def clear(self) -> None:
        self.event.clear()

    async def wait(self, seconds: float) -> bool:
        """Until a notification for the run (True) or ``seconds`` have passed (False)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.event.wait()
            return True
        return False


class RunEventListener:
    """One LISTEN connection for every watcher of a process (per database).

    Started lazily by the first subscription; reconnects with back-off when the
    connection is lost (waking every watcher so they re-read); closes itself
    ``LISTENER_LINGER_S`` after the last watcher left. Notifications only wake
    watchers: they always re-read the table, so a lost one costs at most the
    watcher's re-check interval.
    """

    def __init__(
        self,
        dsn: str,
        *,
        connect: Callable[..., Any] | None = None,
        linger: float = LISTENER_LINGER_S,
    ) -> None:
        self._dsn = dsn
        self.loop = asyncio.get_running_loop()
        self._connect = connect or asyncpg.connect
        self._linger = linger
        self._subs: dict[str, set[Subscription]] = {}
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        #: Set while a LISTEN connection is established (tests and health).
        self.connected = asyncio.Event()
        #: How many connections this listener has opened in its lifetime.
        self.connections_opened = 0

    @property
    def watchers(self) -> int:
        """How many subscriptions are open."""
        return sum(len(subs) for subs in self._subs.values())

    def subscribe(self, run_id: str) -> Subscription:
        """Follow notifications for ``run_id`` (starts the listener if needed)."""
        sub = Subscription(run_id)
        self._subs.setdefault(run_id, set()).add(sub)
        self._changed.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="run-event-listener"
            )
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop following; the connection lingers a while for the next watcher."""
        subs = self._subs.get(sub.run_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.run_id]
        self._changed.set()

    async def close(self) -> None:
        """Stop the listener now (process shutdown, tests)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        for sub in self._subs.get(str(payload), ()):
            sub.event.set()

    def _wake_all(self) -> None:
        for subs in self._subs.values():
            for sub in subs:
                sub.event.set()

    async def _run(self) -> None:
        backoff = LISTENER_BACKOFF_S[0]
        while self._subs:
            try:
                conn = await self._connect(
                    self._dsn, server_settings={"application_name": LISTENER_APPLICATION_NAME}
                )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                logger.warning("run event listener cannot connect: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, LISTENER_BACKOFF_S[1])
                continue
            self.connections_opened += 1
            idle = False
            try:
                lost = asyncio.Event()
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(EVENTS_CHANNEL, self._notify)
                self.connected.set()
                backoff = LISTENER_BACKOFF_S[0]
                self._wake_all()  # whatever was written while we were not listening
                idle = await self._serve(conn, lost)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                logger.warning("run event listener lost its connection: %s", exc)
            finally:
                self.connected.clear()
                self._wake_all()
                if not conn.is_closed():
                    conn.terminate()
            if idle:
                continue  # ``while`` ends unless a watcher came back meanwhile
            await asyncio.sleep(backoff)

    async def _serve(self, conn: asyncpg.Connection, lost: asyncio.Event) -> bool:
        """Keep ``conn`` until it is lost (False) or idle past the linger time (True)."""
        loop = asyncio.get_running_loop()
        idle_since: float | None = None
        while True:
            self._changed.clear()
            waits = {
                asyncio.ensure_future(lost.wait()),
                asyncio.ensure_future(self._changed.wait()),
            }
            try:
                done, _ = await asyncio.wait(
                    waits, timeout=self._linger, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiter in waits:
                    waiter.cancel()
            if lost.is_set() or conn.is_closed():
                return False
            if self._subs:
                idle_since = None
            else:
                idle_since = loop.time() if idle_since is None else idle_since
                if loop.time() - idle_since >= self._linger - 0.001:
                    return True
            if not done:
                # Quiet for a while: a silently dead socket is only noticed by using it.
                await probe(conn, within=LISTENER_PING_TIMEOUT_S)


def _setter(event: asyncio.Event) -> Callable[[object], None]:
    return lambda _conn: event.set()


_LISTENERS: dict[str, RunEventListener] = {}


def database_dsn(db: Database) -> str:
    """The asyncpg DSN of ``db`` (password included)."""
    return asyncpg_dsn(str(db.engine.url.render_as_string(hide_password=False)))


def shared_listener(db: Database) -> RunEventListener:
    """The process's listener for ``db``'s database (shared by every watcher)."""
    dsn = database_dsn(db)
    loop = asyncio.get_running_loop()
    listener = _LISTENERS.get(dsn)
    if listener is None or listener.loop is not loop:
        listener = _LISTENERS[dsn] = RunEventListener(dsn)
    return listener
