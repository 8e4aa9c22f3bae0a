"""AuthService rules: who the caller is, and board keys for users (instance admins)."""

from __future__ import annotations

from common.actor import Actor, ActorType, Role
from common.audit import record_activity
from common.authz import require_instance_admin
from common.db import Database
from common.errors import InvalidArgument, NotFound, invalid
from common.protoconv import timestamp
from common.sql import Row
from common.validation import MAX_NAME, Violations, parse_uuid, require_text
from gateway import foreign_reads, keys
from paperclip.gateway.v1 import auth_pb2

_ROLE_TO_PROTO = {
    Role.ADMIN: auth_pb2.ROLE_ADMIN,
    Role.MEMBER: auth_pb2.ROLE_MEMBER,
    Role.VIEWER: auth_pb2.ROLE_VIEWER,
}
_PROTO_TO_ROLE = {v: k for k, v in _ROLE_TO_PROTO.items()}


def _memberships(values: dict[str, Role]) -> list[auth_pb2.CompanyMembership]:
    return [
        auth_pb2.CompanyMembership(company_id=company, role=_ROLE_TO_PROTO[role])
        for company, role in sorted(values.items())
    ]


def actor_to_proto(actor: Actor) -> auth_pb2.Actor:
    """The caller as WhoAmI reports it."""
    if actor.type is ActorType.AGENT:
        return auth_pb2.Actor(
            type=auth_pb2.ACTOR_TYPE_AGENT,
            agent_id=actor.agent_id or "",
            run_id=actor.run_id or "",
            company_ids=[actor.company_id or ""],
        )
    return auth_pb2.Actor(
        type=auth_pb2.ACTOR_TYPE_BOARD,
        user_id=actor.user_id or "",
        is_instance_admin=actor.is_instance_admin,
        memberships=_memberships(dict(actor.memberships)),
        company_ids=sorted(actor.memberships),
        api_key_id=actor.key_id or "",
    )


def key_to_proto(row: Row) -> auth_pb2.ApiKey:
    return auth_pb2.ApiKey(
        id=str(row["id"]),
        user_id=row["user_id"],
        name=row["name"],
        is_instance_admin=bool(row["is_instance_admin"]),
        memberships=_memberships(keys.parse_memberships(row["memberships"])),
        created_at=timestamp(row["created_at"]),
        revoked_at=timestamp(row["revoked_at"]),
    )


def _parse_create(request: auth_pb2.CreateApiKeyRequest) -> tuple[str, str, dict[str, Role]]:
    v = Violations()
    user_id = name = ""
    try:
        user_id = require_text("user_id", request.user_id, max_length=200)
    except InvalidArgument as exc:
        v.items.extend(exc.violations)
    try:
        name = require_text("name", request.name, max_length=MAX_NAME, required=False)
    except InvalidArgument as exc:
        v.items.extend(exc.violations)
    memberships: dict[str, Role] = {}
    for index, membership in enumerate(request.memberships):
        field = f"memberships[{index}]"
        try:
            company = parse_uuid(f"{field}.company_id", membership.company_id)
        except InvalidArgument as exc:
            v.items.extend(exc.violations)
            continue
        role = _PROTO_TO_ROLE.get(membership.role)
        if role is None:
            v.add(f"{field}.role", "must be ROLE_ADMIN, ROLE_MEMBER or ROLE_VIEWER")
        elif company in memberships:
            v.add(f"{field}.company_id", "appears twice")
        elif company is not None:
            memberships[company] = role
    v.raise_if_any()
    return user_id, name, memberships


async def create_api_key(
    db: Database, actor: Actor, request: auth_pb2.CreateApiKeyRequest
) -> auth_pb2.CreateApiKeyResponse:
    """A new board key for a user with the given memberships (instance admins only)."""
    require_instance_admin(actor)
    user_id, name, memberships = _parse_create(request)
    async with db.unit_of_work() as tx:
        found = await foreign_reads.existing_companies(tx, sorted(memberships))
        missing = sorted(set(memberships) - found)
        if missing:
            raise invalid("memberships", f"no such companies: {', '.join(missing)}")
        row, token = await keys.create_key(
            tx,
            user_id=user_id,
            name=name,
            is_instance_admin=request.is_instance_admin,
            memberships=memberships,
        )
        for company, role in memberships.items():
            record_activity(
                tx,
                actor=actor,
                company_id=company,
                action="api_key.created",
                entity_type="api_key",
                entity_id=str(row["id"]),
                details={"userId": user_id, "role": role.value, "name": name},
            )
    return auth_pb2.CreateApiKeyResponse(api_key=key_to_proto(row), token=token)


async def revoke_api_key(
    db: Database, actor: Actor, request: auth_pb2.RevokeApiKeyRequest
) -> auth_pb2.ApiKey:
    """Revoke a key (idempotent; instance admins only)."""
    require_instance_admin(actor)
    key_id = parse_uuid("api_key_id", request.api_key_id)
    assert key_id is not None
    async with db.unit_of_work() as tx:
        row = await keys.revoke_key(tx, key_id)
        if row is None:
            raise NotFound("API key not found", reason="API_KEY_NOT_FOUND")
        for company in keys.parse_memberships(row["memberships"]):
            record_activity(
                tx,
                actor=actor,
                company_id=company,
                action="api_key.revoked",
                entity_type="api_key",
                entity_id=key_id,
                details={"userId": row["user_id"]},
            )
    return key_to_proto(row)
