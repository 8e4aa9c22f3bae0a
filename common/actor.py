"""Who is calling: the actor model and its HMAC-signed form in gRPC metadata.

The gateway (or a calling service) puts the verified actor in ``x-paperclip-actor``
and an HMAC-SHA256 of it, under the internal key, in ``x-paperclip-actor-sig``.
Services trust nothing else: a call without a valid, fresh signature is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache

from common.errors import Unauthenticated

ACTOR_HEADER = "x-paperclip-actor"
SIGNATURE_HEADER = "x-paperclip-actor-sig"
#: How long a signed actor stays valid; covers clock skew between hosts and the
#: longest deadline of a unary call. Streams are verified once, when they start.
MAX_AGE_SECONDS = 300
_VERSION = "v1"


class ActorType(StrEnum):
    BOARD = "board"
    AGENT = "agent"
    SERVICE = "service"
    SYSTEM = "system"


class Role(StrEnum):
    ADMIN = "admin"
    MEMBER = "member"
    VIEWER = "viewer"


@dataclass(frozen=True, kw_only=True)
class Actor:
    """The verified caller of one request."""

    type: ActorType
    user_id: str | None = None
    agent_id: str | None = None
    #: The agent's company (agents belong to exactly one).
    company_id: str | None = None
    run_id: str | None = None
    #: Board users: company id -> role.
    memberships: Mapping[str, Role] = field(default_factory=dict)
    is_instance_admin: bool = False
    service: str | None = None
    key_id: str | None = None

    @property
    def is_board(self) -> bool:
        return self.type is ActorType.BOARD

    @property
    def is_agent(self) -> bool:
        return self.type is ActorType.AGENT

    @property
    def is_service(self) -> bool:
        return self.type in (ActorType.SERVICE, ActorType.SYSTEM)

    def audit_identity(self) -> tuple[str, str, str | None, str | None]:
        """(actor_type, actor_id, agent_id, run_id) as the audit log records them."""
        if self.type is ActorType.AGENT:
            return ("agent", self.agent_id or "", self.agent_id, self.run_id)
        if self.type is ActorType.BOARD:
            return ("user", self.user_id or "board", None, self.run_id)
        if self.type is ActorType.SERVICE:
            return ("service", self.service or "service", None, self.run_id)
        return ("system", "system", None, None)

    def to_claims(self) -> dict[str, object]:
        """The JSON-safe form carried in metadata."""
        claims: dict[str, object] = {"type": self.type.value}
        for name in ("user_id", "agent_id", "company_id", "run_id", "service", "key_id"):
            value = getattr(self, name)
            if value:
                claims[name] = value
        if self.memberships:
            claims["memberships"] = {k: v.value for k, v in self.memberships.items()}
        if self.is_instance_admin:
            claims["is_instance_admin"] = True
        return claims

    @classmethod
    def from_claims(cls, claims: Mapping[str, object]) -> Actor:
        """Parse the metadata form; raises ``ValueError`` on anything malformed."""
        actor_type = ActorType(str(claims["type"]))
        raw_memberships = claims.get("memberships") or {}
        if not isinstance(raw_memberships, dict):
            raise ValueError("memberships must be an object")

        def text(name: str) -> str | None:
            value = claims.get(name)
            if value is None:
                return None
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string")
            return value

        actor = cls(
            type=actor_type,
            user_id=text("user_id"),
            agent_id=text("agent_id"),
            company_id=text("company_id"),
            run_id=text("run_id"),
            memberships={str(k): Role(str(v)) for k, v in raw_memberships.items()},
            is_instance_admin=bool(claims.get("is_instance_admin", False)),
            service=text("service"),
            key_id=text("key_id"),
        )
        if actor.type is ActorType.AGENT and not (actor.agent_id and actor.company_id):
            raise ValueError("an agent actor needs agent_id and company_id")
        if actor.type is ActorType.BOARD and not actor.user_id:
            raise ValueError("a board actor needs user_id")
        return actor


def service_actor(name: str) -> Actor:
    """The actor a service uses for its own calls to another service."""
    return Actor(type=ActorType.SERVICE, service=name)


SYSTEM_ACTOR = Actor(type=ActorType.SYSTEM)


def _mac(key: bytes, payload: str) -> str:
    return hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()


def sign_actor(
    actor: Actor, key: bytes, *, now: float | None = None
) -> tuple[tuple[str, str], ...]:
    """The two metadata entries that carry ``actor`` signed with ``key``."""
    claims = actor.to_claims()
    claims["iat"] = int(now if now is not None else time.time())
    body = base64.urlsafe_b64encode(
        json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
    ).decode()
    payload = f"{_VERSION}.{body}"
    return ((ACTOR_HEADER, payload), (SIGNATURE_HEADER, _mac(key, payload)))


def verify_actor(metadata: Mapping[str, str], key: bytes, *, now: float | None = None) -> Actor:
    """The actor carried by ``metadata``; ``Unauthenticated`` unless validly signed."""
    payload = metadata.get(ACTOR_HEADER)
    signature = metadata.get(SIGNATURE_HEADER)
    if not payload or not signature:
        raise Unauthenticated("missing signed actor", reason="UNAUTHENTICATED")
    issued, actor = _verified(key, payload, signature)
    current = now if now is not None else time.time()
    if abs(current - issued) > MAX_AGE_SECONDS:
        raise Unauthenticated("signed actor has expired", reason="UNAUTHENTICATED")
    return actor


@lru_cache(maxsize=4096)
def _verified(key: bytes, payload: str, signature: str) -> tuple[int, Actor]:
    """(issued at, actor) of a validly signed payload. The answer depends on nothing
    else, so it is kept: a caller signs once per second at most, and its every call in
    that second skips the HMAC and the parse (the age is checked on every call)."""
    if not hmac.compare_digest(_mac(key, payload), signature):
        raise Unauthenticated("actor signature does not verify", reason="UNAUTHENTICATED")
    try:
        version, body = payload.split(".", 1)
        if version != _VERSION:
            raise ValueError(f"unknown actor version {version}")
        claims = json.loads(base64.urlsafe_b64decode(body.encode()))
        if not isinstance(claims, dict):
            raise ValueError("claims must be an object")
        issued = int(claims.pop("iat"))
        actor = Actor.from_claims(claims)
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        raise Unauthenticated(f"malformed actor: {exc}", reason="UNAUTHENTICATED") from exc
    return issued, actor
