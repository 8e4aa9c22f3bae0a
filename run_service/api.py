"""The public ``paperclip.runs.v1.RunService`` servicer: an entrypoint only.

Each RPC takes the verified actor of the call, hands the request to one service
function and returns its proto. No SQL and no rules here; errors are raised deep
inside and mapped to gRPC status by the interceptor.
"""

from __future__ import annotations

from typing import Any

import grpc

from common.db import Database
from common.request_context import current_actor
from paperclip.runs.v1 import agents_pb2, runs_pb2_grpc
from run_service import agents

Context = grpc.aio.ServicerContext[Any, Any]


class RunServicer(runs_pb2_grpc.RunServiceServicer):
    """Agents (this issue) and, later, their runs."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def CreateAgent(
        self, request: agents_pb2.CreateAgentRequest, context: Context
    ) -> agents_pb2.Agent:
        """Register an agent in a company."""
        return await agents.create_agent(self._db, current_actor(), request)

    async def GetAgent(
        self, request: agents_pb2.GetAgentRequest, context: Context
    ) -> agents_pb2.Agent:
        """One agent by id."""
        return await agents.get_agent(self._db, current_actor(), request.agent_id)

    async def ListAgents(
        self, request: agents_pb2.ListAgentsRequest, context: Context
    ) -> agents_pb2.ListAgentsResponse:
        """A page of a company's agents."""
        return await agents.list_agents(self._db, current_actor(), request)

    async def UpdateAgent(
        self, request: agents_pb2.UpdateAgentRequest, context: Context
    ) -> agents_pb2.Agent:
        """Pause, resume, terminate, rename or reconfigure an agent."""
        return await agents.update_agent(self._db, current_actor(), request)
