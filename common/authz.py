"""Authorization rules shared by every service: company scope, board-only, service-only.

Authorization lives next to the data (docs/architecture.md): each service function calls
these with the actor of the request before it reads or writes.
"""

from __future__ import annotations

from common.actor import Actor, ActorType, Role
from common.errors import PermissionDenied, Unauthenticated


def require_company_access(actor: Actor, company_id: str, *, write: bool) -> None:
    """Refuse unless ``actor`` may read (or, with ``write``, change) the company."""
    if actor.is_service or actor.is_instance_admin:
        return
    if actor.type is ActorType.AGENT:
        if actor.company_id != company_id:
            raise PermissionDenied(
                "agent cannot access another company",
                reason="COMPANY_ACCESS_DENIED",
                metadata={"company_id": company_id},
            )
        return
    role = actor.memberships.get(company_id)
    if role is None:
        raise PermissionDenied(
            "user does not have access to this company",
            reason="COMPANY_ACCESS_DENIED",
            metadata={"company_id": company_id},
        )
    if write and role is Role.VIEWER:
        raise PermissionDenied(
            "viewer access is read-only",
            reason="COMPANY_ACCESS_DENIED",
            metadata={"company_id": company_id, "role": role.value},
        )


def require_board(actor: Actor) -> None:
    """Refuse any caller but a board user."""
    if actor.type is not ActorType.BOARD:
        raise PermissionDenied("board access required", reason="BOARD_REQUIRED")


def require_instance_admin(actor: Actor) -> None:
    """Refuse any caller but an instance-admin board user (or a service)."""
    if actor.is_service:
        return
    require_board(actor)
    if not actor.is_instance_admin:
        raise PermissionDenied("instance admin required", reason="BOARD_REQUIRED")


def require_service(actor: Actor) -> None:
    """Refuse any caller but another service of the suite."""
    if not actor.is_service:
        raise PermissionDenied("internal service call only", reason="SERVICE_REQUIRED")


def require_agent_run(actor: Actor) -> str:
    """The run of an agent actor; an agent call without a run is refused."""
    if actor.run_id:
        return actor.run_id
    raise Unauthenticated("agent run id required", reason="AGENT_RUN_REQUIRED")


def require_acting_as(actor: Actor, agent_id: str) -> None:
    """An agent may only act as itself."""
    if actor.type is ActorType.AGENT and actor.agent_id != agent_id:
        raise PermissionDenied(
            "agent can only act as itself",
            reason="AGENT_MISMATCH",
            metadata={"actor_agent_id": actor.agent_id or "", "agent_id": agent_id},
        )
