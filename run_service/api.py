"""The public ``paperclip.runs.v1.RunService`` servicer: an entrypoint only.

Each RPC takes the verified actor of the call, hands the request to one service
function and returns its proto. No SQL and no rules here; errors are raised deep
inside and mapped to gRPC status by the interceptor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from common.db import Database
from common.interceptors import Context
from common.request_context import current_actor
from paperclip.runs.v1 import agents_pb2, run_messages_pb2, runs_pb2, runs_pb2_grpc
from run_service import agents, reconcile, recovery, run_control, run_queries, wakes
from run_service.runner import Runner


class RunServicer(runs_pb2_grpc.RunServiceServicer):
    """Agents, wakes and runs."""

    def __init__(self, db: Database, runner: Runner) -> None:
        self._db = db
        self._runner = runner

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

    async def WakeAgent(
        self, request: runs_pb2.WakeAgentRequest, context: Context
    ) -> runs_pb2.WakeAgentResponse:
        """Ask for a run: queued, coalesced, deferred or skipped."""
        return await wakes.wake_agent(self._db, current_actor(), request)

    async def GetRun(
        self, request: runs_pb2.GetRunRequest, context: Context
    ) -> run_messages_pb2.Run:
        """One run by id."""
        return await run_queries.get_run(self._db, current_actor(), request.run_id)

    async def ListRuns(
        self, request: runs_pb2.ListRunsRequest, context: Context
    ) -> runs_pb2.ListRunsResponse:
        """A page of runs, newest first."""
        return await run_queries.list_runs(self._db, current_actor(), request)

    async def CancelRun(
        self, request: runs_pb2.CancelRunRequest, context: Context
    ) -> run_messages_pb2.Run:
        """Kill the run's process tree and end it as cancelled."""
        return await run_control.cancel_run(self._db, self._runner, current_actor(), request)

    async def ReportRunActivity(
        self, request: runs_pb2.ReportRunActivityRequest, context: Context
    ) -> run_messages_pb2.Run:
        """The agent is alive: renew the run's idle timer."""
        return await run_control.report_run_activity(
            self._db, self._runner, current_actor(), request
        )

    async def ListRunEvents(
        self, request: runs_pb2.ListRunEventsRequest, context: Context
    ) -> runs_pb2.ListRunEventsResponse:
        """A page of a run's events in order."""
        return await run_queries.list_run_events(self._db, current_actor(), request)

    async def WatchRun(
        self, request: runs_pb2.WatchRunRequest, context: Context
    ) -> AsyncIterator[run_messages_pb2.RunEvent]:
        """The run's events, live, until its terminal event."""
        async for event in run_queries.watch_run(self._db, current_actor(), request):
            yield event

    async def ReapOrphanedRuns(
        self, request: runs_pb2.ReapOrphanedRunsRequest, context: Context
    ) -> runs_pb2.ReapOrphanedRunsResponse:
        """One recovery pass over orphaned running runs (instance admins)."""
        return await recovery.reap_orphaned_runs(self._db, self._runner, current_actor())

    async def ReconcileStrandedIssues(
        self, request: runs_pb2.ReconcileStrandedIssuesRequest, context: Context
    ) -> runs_pb2.ReconcileStrandedIssuesResponse:
        """One pass over stranded agent-assigned issues (instance admins)."""
        return await reconcile.reconcile_stranded_issues(self._db, self._runner, current_actor())
