"""The agent registry: CreateAgent, GetAgent, ListAgents and UpdateAgent.

Each function is one unit of work: authorize, validate (bad input writes nothing),
apply the rule and write the change and its audit row in one transaction. Runs come
later; nothing here starts anything. Update rules and the audit scheme of updates are
in ``run_service.agent_update``.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from common.actor import Actor
from common.audit import record_activity
from common.authz import require_board, require_company_access
from common.db import Database
from common.errors import NotFound, invalid
from common.pagination import parse_page
from common.validation import Violations
from paperclip.runs.v1 import agents_pb2
from run_service import agent_store, foreign_reads
from run_service.agent_config import (
    DEFAULT_RUNTIME,
    NewAgent,
    apply_runtime,
    check_adapter,
    check_adapter_type,
    check_name,
    check_role,
    check_runtime,
    check_uuid,
)
from run_service.agent_store import STATUS_FROM_PROTO, AgentRecord
from run_service.agent_update import apply_patch, audit_action, parse_update

ENTITY_TYPE = "agent"
CREATED_ACTION = "agent.created"


def agent_not_found(agent_id: str) -> NotFound:
    """The error for an agent id that names no agent."""
    return NotFound("agent not found", reason="AGENT_NOT_FOUND", metadata={"agent_id": agent_id})


def company_not_found(company_id: str) -> NotFound:
    """The error for a company id that names no company."""
    return NotFound(
        "company not found", reason="COMPANY_NOT_FOUND", metadata={"company_id": company_id}
    )


async def create_agent(
    db: Database, actor: Actor, request: agents_pb2.CreateAgentRequest
) -> agents_pb2.Agent:
    """Register an agent (board, write access); audited as ``agent.created``."""
    require_board(actor)
    v = Violations()
    company_id = check_uuid(v, "company_id", request.company_id)
    if company_id:
        # Refuse other companies before judging the payload.
        require_company_access(actor, company_id, write=True)
    new = NewAgent(
        company_id=company_id,
        name=check_name(v, "name", request.name),
        role=check_role(v, "role", request.role),
        adapter_type=check_adapter_type(v, "adapter_type", request.adapter_type),
        adapter=check_adapter(v, "adapter_config", request.adapter_config),
        runtime=apply_runtime(
            DEFAULT_RUNTIME, check_runtime(v, "runtime_config", request.runtime_config)
        ),
    )
    v.raise_if_any()
    async with db.unit_of_work() as tx:
        if not await foreign_reads.company_exists(tx, company_id):
            raise company_not_found(company_id)
        record = await agent_store.insert_agent(tx, new)
        record_activity(
            tx,
            actor=actor,
            company_id=company_id,
            action=CREATED_ACTION,
            entity_type=ENTITY_TYPE,
            entity_id=record.id,
            details={
                "name": record.name,
                "role": record.role,
                "adapter_type": record.adapter_type,
                "adapter_config": record.adapter.audit_form(),
                "runtime_config": record.runtime.to_json(),
            },
        )
    return record.to_proto()


async def get_agent(db: Database, actor: Actor, agent_id: str) -> agents_pb2.Agent:
    """One agent, for any actor who may read its company; only board users see the
    values of its env (agents see the keys)."""
    v = Violations()
    canonical = check_uuid(v, "agent_id", agent_id)
    v.raise_if_any()
    async with db.unit_of_work() as tx:
        record = await agent_store.get_agent(tx, canonical)
    if record is None:
        raise agent_not_found(canonical)
    require_company_access(actor, record.company_id, write=False)
    return record.to_proto(redact_env=not actor.is_board)


async def list_agents(
    db: Database, actor: Actor, request: agents_pb2.ListAgentsRequest
) -> agents_pb2.ListAgentsResponse:
    """A page of the company's agents, oldest first (AIP-132, keyset on created_at, id)."""
    v = Violations()
    company_id = check_uuid(v, "company_id", request.company_id)
    statuses: set[str] = set()
    for index, value in enumerate(request.statuses):
        status = STATUS_FROM_PROTO.get(value)
        if status is None:
            v.add(f"statuses[{index}]", "must be a known, specified AgentStatus")
        else:
            statuses.add(status)
    v.raise_if_any()
    require_company_access(actor, company_id, write=False)
    wanted = sorted(statuses)
    page = parse_page(request.page_size, request.page_token, company_id=company_id, statuses=wanted)
    after = _cursor_position(page.cursor)
    async with db.unit_of_work() as tx:
        if not await foreign_reads.company_exists(tx, company_id):
            raise company_not_found(company_id)
        records = await agent_store.list_agents(
            tx, company_id=company_id, statuses=wanted, after=after, limit=page.fetch_limit
        )
    shown, token = page.finish(records, _cursor_of)
    return agents_pb2.ListAgentsResponse(
        agents=[record.to_proto(redact_env=not actor.is_board) for record in shown],
        next_page_token=token,
    )


def _cursor_of(record: AgentRecord) -> dict[str, str]:
    return {"t": record.created_at.isoformat(), "id": record.id}


def _cursor_position(cursor: dict[str, object] | None) -> tuple[datetime, str] | None:
    """The (created_at, id) a token points after; tokens are not signed, so check it."""
    if cursor is None:
        return None
    try:
        created_at = datetime.fromisoformat(str(cursor["t"]))
        agent_id = str(uuid.UUID(str(cursor["id"])))
    except (KeyError, ValueError) as exc:
        raise invalid("page_token", "is not a token this service issued") from exc
    if created_at.tzinfo is None:
        raise invalid("page_token", "is not a token this service issued")
    return created_at, agent_id


async def update_agent(
    db: Database, actor: Actor, request: agents_pb2.UpdateAgentRequest
) -> agents_pb2.Agent:
    """Apply ``update_mask`` under a row lock (board, write access); a no-op writes nothing."""
    require_board(actor)
    patch = parse_update(request)
    async with db.unit_of_work() as tx:
        current = await agent_store.get_agent(tx, patch.agent_id, for_update=True)
        if current is None:
            raise agent_not_found(patch.agent_id)
        require_company_access(actor, current.company_id, write=True)
        updated, changes = apply_patch(current, patch)
        if not changes:
            return current.to_proto()
        saved = await agent_store.update_agent(tx, updated)
        record_activity(
            tx,
            actor=actor,
            company_id=saved.company_id,
            action=audit_action(current.status, saved.status),
            entity_type=ENTITY_TYPE,
            entity_id=saved.id,
            details={"changes": changes},
        )
    return saved.to_proto()
