"""Board API keys, their users and company memberships (the ``gateway`` schema; its
statements are in ``key_store``).

A key is ``pcb_`` and 43 random URL-safe characters (256 bits), shown once; the table
keeps only its SHA-256 (a salt adds nothing to a random secret this long).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from common.actor import Actor, ActorType, Role
from common.sql import Row, Tx
from gateway import key_store

KEY_PREFIX = "pcb_"


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
    row = await key_store.key_by_hash(tx, key_hash(token))
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
    await key_store.upsert_user(tx, user_id, is_instance_admin=is_instance_admin)
    for company, role in sorted(memberships.items()):
        await key_store.upsert_membership(tx, user_id, company, role.value)
    token = new_key()
    key_id = await key_store.insert_key(tx, user_id, name, key_hash(token))
    full = await key_store.key_by_id(tx, key_id)
    assert full is not None
    return full, token


async def revoke_key(tx: Tx, key_id: str) -> Row | None:
    """Revoke a key (idempotent); the key after, or None when it does not exist."""
    await key_store.revoke_key(tx, key_id)
    return await key_store.key_by_id(tx, key_id)
