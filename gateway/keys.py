"""Board API keys, their users and company memberships (the ``gateway`` schema).

A key is ``pcb_`` and 43 random URL-safe characters (256 bits), shown once; the table
keeps only its SHA-256 (a salt adds nothing to a random secret this long).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from common.actor import Actor, ActorType, Role
from common.sql import Row, Tx, sql

KEY_PREFIX = "pcb_"

_UPSERT_USER = sql(
    """
    INSERT INTO gateway.users (id, is_instance_admin) VALUES (:id, :admin)
    ON CONFLICT (id) DO UPDATE
        SET is_instance_admin = gateway.users.is_instance_admin OR EXCLUDED.is_instance_admin,
            updated_at = now()
    """
)
_UPSERT_MEMBERSHIP = sql(
    """
    INSERT INTO gateway.company_memberships (user_id, company_id, role)
    VALUES (:user, :company, :role)
    ON CONFLICT (user_id, company_id) DO UPDATE SET role = EXCLUDED.role, status = 'active'
    """
)
_INSERT_KEY = sql(
    """
    INSERT INTO gateway.api_keys (user_id, name, key_hash) VALUES (:user, :name, :hash)
    RETURNING id
    """
)
_KEY_BY_HASH = sql(
    """
    SELECT k.id, k.user_id, k.revoked_at, u.is_instance_admin,
        ARRAY(SELECT m.company_id::text || ':' || m.role FROM gateway.company_memberships m
              WHERE m.user_id = k.user_id AND m.status = 'active'
              ORDER BY m.company_id) AS memberships
    FROM gateway.api_keys k JOIN gateway.users u ON u.id = k.user_id
    WHERE k.key_hash = :hash
    """
)
_KEY_BY_ID = sql(
    """
    SELECT k.id, k.user_id, k.name, k.created_at, k.revoked_at, u.is_instance_admin,
        ARRAY(SELECT m.company_id::text || ':' || m.role FROM gateway.company_memberships m
              WHERE m.user_id = k.user_id AND m.status = 'active'
              ORDER BY m.company_id) AS memberships
    FROM gateway.api_keys k JOIN gateway.users u ON u.id = k.user_id
    WHERE k.id = :id
    """
)
_REVOKE = sql("UPDATE gateway.api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = :id")


@dataclass(frozen=True)
class KeyOwner:
    """What a presented key resolves to."""

    key_id: str
    user_id: str
    revoked: bool
    actor: Actor


def new_key() -> str:
    """A fresh secret board key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(token: str) -> bytes:
    """What the table stores for a key."""
    return hashlib.sha256(token.encode()).digest()


def parse_memberships(values: Sequence[str]) -> dict[str, Role]:
    """``company:role`` strings (as the queries build them) as a membership map."""
    out: dict[str, Role] = {}
    for value in values:
        company, _, role = value.partition(":")
        out[company] = Role(role)
    return out


def board_actor(row: Row) -> Actor:
    """The board actor a key row (with memberships) authenticates."""
    return Actor(
        type=ActorType.BOARD,
        user_id=row["user_id"],
        memberships=parse_memberships(row["memberships"]),
        is_instance_admin=bool(row["is_instance_admin"]),
        key_id=str(row["id"]),
    )


async def find_key(tx: Tx, token: str) -> KeyOwner | None:
    """The owner of a presented key (None when no key has that hash)."""
    row = await tx.fetchrow(_KEY_BY_HASH, {"hash": key_hash(token)})
    if row is None:
        return None
    return KeyOwner(str(row["id"]), row["user_id"], row["revoked_at"] is not None, board_actor(row))


async def create_key(
    tx: Tx,
    *,
    user_id: str,
    name: str,
    is_instance_admin: bool,
    memberships: dict[str, Role],
) -> tuple[Row, str]:
    """Create (or update) the user and its memberships, then a key; (key row, secret)."""
    await tx.execute(_UPSERT_USER, {"id": user_id, "admin": is_instance_admin})
    for company, role in sorted(memberships.items()):
        await tx.execute(
            _UPSERT_MEMBERSHIP, {"user": user_id, "company": company, "role": role.value}
        )
    token = new_key()
    inserted = await tx.fetchrow(
        _INSERT_KEY, {"user": user_id, "name": name, "hash": key_hash(token)}
    )
    assert inserted is not None
    full = await tx.fetchrow(_KEY_BY_ID, {"id": inserted["id"]})
    assert full is not None
    return full, token


async def revoke_key(tx: Tx, key_id: str) -> Row | None:
    """Revoke a key (idempotent); the key after, or None when it does not exist."""
    await tx.execute(_REVOKE, {"id": key_id})
    return await tx.fetchrow(_KEY_BY_ID, {"id": key_id})
