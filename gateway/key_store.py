"""SQL of board API keys, their users and company memberships (the ``gateway`` schema),
in the unit of work of the caller. A key row is read with the user's instance-admin flag
and its active memberships as ``company:role`` strings."""

from __future__ import annotations

from common.sql import Row, Tx, sql

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


async def key_by_hash(tx: Tx, key_hash: bytes) -> Row | None:
    """The key whose SHA-256 is ``key_hash`` (id, user_id, revoked_at, is_instance_admin,
    memberships)."""
    return await tx.fetchrow(_KEY_BY_HASH, {"hash": key_hash})


async def key_by_id(tx: Tx, key_id: str) -> Row | None:
    """The key ``key_id`` (id, user_id, name, created_at, revoked_at, is_instance_admin,
    memberships)."""
    return await tx.fetchrow(_KEY_BY_ID, {"id": key_id})


async def upsert_user(tx: Tx, user_id: str, *, is_instance_admin: bool) -> None:
    """Create the user, or make it an instance admin when asked (never the reverse)."""
    await tx.execute(_UPSERT_USER, {"id": user_id, "admin": is_instance_admin})


async def upsert_membership(tx: Tx, user_id: str, company_id: str, role: str) -> None:
    """An active membership of the user in the company with ``role``."""
    await tx.execute(_UPSERT_MEMBERSHIP, {"user": user_id, "company": company_id, "role": role})


async def insert_key(tx: Tx, user_id: str, name: str, key_hash: bytes) -> str:
    """A new key of the user; its id."""
    inserted = await tx.fetchrow(_INSERT_KEY, {"user": user_id, "name": name, "hash": key_hash})
    assert inserted is not None
    return str(inserted["id"])


async def revoke_key(tx: Tx, key_id: str) -> None:
    """Set the key's ``revoked_at`` unless it is set already."""
    await tx.execute(_REVOKE, {"id": key_id})
