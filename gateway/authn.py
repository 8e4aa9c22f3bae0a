"""Authentication of public calls from ``authorization: Bearer <token>``.

Two kinds of token: an agent run token (a JWT, valid only while its run is live) and a
board API key. Verified callers are cached for a few seconds, keyed by a hash of the
token; PostgreSQL notifications (``paperclip_auth``) evict an entry the moment its run
finishes or its key, user or memberships change. Without a live listener nothing is
cached, so a revocation is never missed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import asyncpg

from common.actor import Actor, ActorType
from common.db import Database
from common.errors import Unauthenticated
from common.run_tokens import looks_like_jwt, verify_run_token
from common.validation import is_uuid
from gateway import foreign_reads, keys

log = logging.getLogger("paperclip.gateway.auth")

CACHE_TTL_SECONDS = 5.0
NOTIFY_CHANNEL = "paperclip_auth"
_LIVE_RUN_STATUSES = frozenset({"queued", "running"})
#: Longest ``authorization`` header read: run tokens and board keys are far shorter.
#: Longer headers, up to the server's metadata limit (``common.server``), are refused
#: here before any hashing or lookup.
MAX_AUTHORIZATION_LENGTH = 4096


@dataclass
class _Entry:
    actor: Actor
    expires_at: float
    tags: tuple[str, ...]


@dataclass
class AuthCache:
    """Verified callers by token digest, evicted by tag (``run:<id>``, ``user:<id>``)."""

    ttl: float = CACHE_TTL_SECONDS
    enabled: bool = False
    _entries: dict[bytes, _Entry] = field(default_factory=dict)
    _by_tag: dict[str, set[bytes]] = field(default_factory=dict)
    #: When each tag was last invalidated: a lookup that began earlier is not cached.
    _invalidated: dict[str, float] = field(default_factory=dict)

    def get(self, digest: bytes) -> Actor | None:
        entry = self._entries.get(digest)
        if entry is None or not self.enabled:
            return None
        if entry.expires_at < time.monotonic():
            self._drop(digest)
            return None
        return entry.actor

    def put(
        self, digest: bytes, actor: Actor, tags: tuple[str, ...], *, ttl: float, since: float
    ) -> None:
        """Cache ``actor`` unless one of its tags was invalidated after ``since`` (the
        monotonic time the lookup began): a notification may overtake the lookup."""
        if not self.enabled or any(self._invalidated.get(t, -1.0) >= since for t in tags):
            return
        self._entries[digest] = _Entry(actor, time.monotonic() + min(ttl, self.ttl), tags)
        for tag in tags:
            self._by_tag.setdefault(tag, set()).add(digest)

    def invalidate(self, tag: str) -> None:
        now = time.monotonic()
        self._invalidated[tag] = now
        if len(self._invalidated) > 10_000:
            horizon = now - 60.0
            self._invalidated = {t: at for t, at in self._invalidated.items() if at > horizon}
        for digest in self._by_tag.pop(tag, set()):
            self._drop(digest)

    def clear(self) -> None:
        self._entries.clear()
        self._by_tag.clear()

    def _drop(self, digest: bytes) -> None:
        entry = self._entries.pop(digest, None)
        if entry is None:
            return
        for tag in entry.tags:
            digests = self._by_tag.get(tag)
            if digests is not None:
                digests.discard(digest)
                if not digests:
                    del self._by_tag[tag]


async def listen_for_invalidations(dsn: str, cache: AuthCache) -> None:
    """Keep a LISTEN connection; the cache is on only while it is up. Runs until
    cancelled, reconnecting with backoff."""
    delay = 0.5
    while True:
        lost = asyncio.Event()
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(dsn)
            conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
            await conn.add_listener(
                NOTIFY_CHANNEL, lambda _c, _pid, _channel, payload: cache.invalidate(payload)
            )
            cache.clear()
            cache.enabled = True
            delay = 0.5
            await lost.wait()
        except asyncio.CancelledError:
            raise
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("auth listener unavailable", extra={"error": str(exc)})
        finally:
            cache.enabled = False
            cache.clear()
            if conn is not None and not conn.is_closed():
                conn.terminate()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)


def bearer_token(metadata: Mapping[str, str]) -> str:
    """The token of ``authorization: Bearer <token>``; UNAUTHENTICATED when absent,
    malformed or longer than any token the gateway issues."""
    header = metadata.get("authorization")
    if not header:
        raise Unauthenticated("missing authorization: Bearer <token>", reason="UNAUTHENTICATED")
    if len(header) > MAX_AUTHORIZATION_LENGTH:
        raise Unauthenticated(
            f"authorization must be at most {MAX_AUTHORIZATION_LENGTH} characters",
            reason="UNAUTHENTICATED",
        )
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization must be 'Bearer <token>'", reason="UNAUTHENTICATED")
    return token.strip()


class BearerAuthenticator:
    """The gateway's authenticator: run tokens and board keys."""

    def __init__(self, db: Database, jwt_secret: bytes, cache: AuthCache) -> None:
        self.db = db
        self.jwt_secret = jwt_secret
        self.cache = cache

    async def authenticate(self, metadata: Mapping[str, str]) -> Actor:
        token = bearer_token(metadata)
        digest = hashlib.sha256(token.encode()).digest()
        cached = self.cache.get(digest)
        if cached is not None:
            return cached
        if looks_like_jwt(token):
            return await self._agent(token, digest)
        if token.startswith(keys.KEY_PREFIX):
            return await self._board(token, digest)
        raise Unauthenticated("unrecognised token", reason="UNAUTHENTICATED")

    async def _agent(self, token: str, digest: bytes) -> Actor:
        claims = verify_run_token(self.jwt_secret, token)
        if not all(is_uuid(v) for v in (claims.run_id, claims.agent_id, claims.company_id)):
            # Validly signed yet not ids: refused here, not by the database (UNKNOWN).
            raise Unauthenticated("run token names no valid run", reason="UNAUTHENTICATED")
        since = time.monotonic()
        async with self.db.unit_of_work() as tx:
            run = await foreign_reads.get_run(tx, claims.run_id)
        if run is None or run["status"] not in _LIVE_RUN_STATUSES:
            raise Unauthenticated(
                "the run of this token has finished",
                reason="RUN_TOKEN_REVOKED",
                metadata={"run_id": claims.run_id, "run_status": run["status"] if run else ""},
            )
        if str(run["agent_id"]) != claims.agent_id or str(run["company_id"]) != claims.company_id:
            raise Unauthenticated("run token does not match its run", reason="UNAUTHENTICATED")
        actor = Actor(
            type=ActorType.AGENT,
            agent_id=claims.agent_id,
            company_id=claims.company_id,
            run_id=claims.run_id,
        )
        ttl = claims.expires_at - time.time()
        self.cache.put(digest, actor, (f"run:{claims.run_id}",), ttl=ttl, since=since)
        return actor

    async def _board(self, token: str, digest: bytes) -> Actor:
        since = time.monotonic()
        async with self.db.unit_of_work() as tx:
            owner = await keys.find_key(tx, token)
        if owner is None:
            raise Unauthenticated("unknown API key", reason="UNAUTHENTICATED")
        if owner.revoked:
            raise Unauthenticated(
                "API key has been revoked",
                reason="API_KEY_REVOKED",
                metadata={"api_key_id": owner.key_id},
            )
        self.cache.put(
            digest, owner.actor, (f"user:{owner.user_id}",), ttl=self.cache.ttl, since=since
        )
        return owner.actor
