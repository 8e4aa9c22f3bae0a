"""The context of the workspace service: what its functions work with (the database,
the settings, the host they run on, the supervisor of this host's runtime service
processes and the per-workspace locks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.actor import Actor
from common.config import Settings
from common.db import Database
from workspace_service.keyed_locks import KeyedLocks
from workspace_service.recorder import OperationContext, Recorder

if TYPE_CHECKING:
    from workspace_service.runtime_services import RuntimeSupervisor


@dataclass(frozen=True)
class ServiceContext:
    """What one workspace-service process works with; passed to its functions as ``ctx``."""

    db: Database
    settings: Settings
    runtime: RuntimeSupervisor
    host: str
    #: Lifecycle changes of one workspace (or one issue's workspace) run one at a time.
    locks: KeyedLocks = field(default_factory=KeyedLocks)

    def recorder(
        self,
        actor: Actor,
        *,
        company_id: str,
        workspace_id: str | None = None,
        issue_id: str | None = None,
    ) -> Recorder:
        """A recorder of operations run by ``actor`` on this host."""
        return Recorder(
            self.db,
            OperationContext(
                company_id=company_id,
                actor=actor,
                host=self.host,
                workspace_id=workspace_id,
                run_id=actor.run_id,
                issue_id=issue_id,
            ),
        )
