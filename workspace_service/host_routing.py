"""Calls about a workspace go to the replica of the host that owns it.

The calls that touch a workspace's directory or its processes (close readiness,
archive, runtime service control) are served by the replica of the workspace's host;
a replica receiving one for another host forwards it there as it came (the caller's
signed actor and request id) and relays the answer, errors included. Creating a
workspace for an agent goes to the host that runs the agent's run, so the agent finds
its directory; a board user's workspace is made on the replica the call reached.

When the owning host has no live registration, or its replica cannot be reached, the
call answers ``UNAVAILABLE`` with reason ``WORKSPACE_HOST_UNAVAILABLE`` and the host in
the metadata: it works again once that host's replica is back. A forwarded call is
never forwarded again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from common import tracing
from common.actor import ACTOR_HEADER, SIGNATURE_HEADER, Actor
from common.channels import BACKEND_OPTIONS
from common.db import Database
from common.errors import STATUS_DETAILS_KEY, Unavailable, from_rpc_error
from common.interceptors import REQUEST_ID_HEADER, Context
from common.validation import is_uuid
from paperclip.workspaces.v1 import workspaces_pb2_grpc
from workspace_service import foreign_reads, host_store

_AnswerT = TypeVar("_AnswerT", bound=Message)

HOST_UNAVAILABLE = "WORKSPACE_HOST_UNAVAILABLE"
#: Set on a forwarded call: the host it was forwarded from.
FORWARDED_HEADER = "x-paperclip-forwarded-from"
_PASSED_ON = (ACTOR_HEADER, SIGNATURE_HEADER, REQUEST_ID_HEADER)
#: Deadline of a forwarded call when the caller set none (long: commands may run).
DEFAULT_FORWARD_TIMEOUT_S = 3600.0


def host_unavailable(host: str, why: str) -> Unavailable:
    return Unavailable(
        f"the workspace host {host} is unavailable: {why}; retry once it is back",
        reason=HOST_UNAVAILABLE,
        metadata={"host": host},
    )


class Remote:
    """The replica of another host, reached with the caller's credentials."""

    def __init__(
        self, host: str, stub: workspaces_pb2_grpc.WorkspaceServiceAsyncStub, origin: str
    ) -> None:
        self.host = host
        self._stub = stub
        self._origin = origin

    async def call(
        self, method: str, request: Message, context: Context, answer: type[_AnswerT]
    ) -> _AnswerT:
        """Forward ``request`` to ``method`` of that replica; its ``answer``, or its error."""
        received = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        metadata = [(key, received[key]) for key in _PASSED_ON if key in received]
        metadata.append((FORWARDED_HEADER, self._origin))
        remaining = context.time_remaining()
        multicallable: Callable[..., Any] = getattr(self._stub, method)
        try:
            reply = await multicallable(
                request,
                metadata=metadata,
                timeout=DEFAULT_FORWARD_TIMEOUT_S if remaining is None else max(remaining, 0.001),
            )
        except grpc.aio.AioRpcError as err:
            if err.code() is grpc.StatusCode.UNAVAILABLE and not _has_details(err):
                raise host_unavailable(self.host, "its replica does not answer") from err
            raise from_rpc_error(err) from err
        if not isinstance(reply, answer):
            raise TypeError(f"{method} answered {type(reply).__name__}")
        return reply


def _has_details(err: grpc.aio.AioRpcError) -> bool:
    return any(key == STATUS_DETAILS_KEY for key, _ in err.trailing_metadata() or ())


class HostRouter:
    """Finds the replica that must serve a call, for the replica of ``host``."""

    def __init__(self, db: Database, host: str) -> None:
        self._db = db
        self.host = host
        self._stubs: dict[str, workspaces_pb2_grpc.WorkspaceServiceAsyncStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def for_workspace(self, workspace_id: str, context: Context) -> Remote | None:
        """The replica to forward a call about ``workspace_id`` to; None when this one
        serves it (its own host, an unknown workspace, a workspace of no recorded host)."""
        if not is_uuid(workspace_id):
            return None  # the local handler names the bad field
        async with self._db.unit_of_work() as tx:
            owner = await host_store.workspace_host(tx, workspace_id)
        if owner is None or owner.host == self.host:
            return None
        return self._remote(owner, context)

    async def for_new_workspace(self, actor: Actor, context: Context) -> Remote | None:
        """The replica that creates a workspace for ``actor``: the host running the
        agent's run, else this one."""
        if actor.run_id is None or not is_uuid(actor.run_id):
            return None
        async with self._db.unit_of_work() as tx:
            host = await foreign_reads.run_host(tx, actor.run_id)
            if host is None or host == self.host:
                return None
            target = await host_store.host_address(tx, host)
        return self._remote(target, context)

    def _remote(self, target: host_store.HostAddress, context: Context) -> Remote:
        received = dict(context.invocation_metadata() or ())
        if FORWARDED_HEADER in received:
            raise host_unavailable(
                target.host, "the call was forwarded to a replica of another host"
            )
        if not target.live or target.address is None:
            raise host_unavailable(target.host, "no live replica is registered for it")
        return Remote(target.host, self._stub(target.address), self.host)

    def _stub(self, address: str) -> workspaces_pb2_grpc.WorkspaceServiceAsyncStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(
                address,
                options=BACKEND_OPTIONS,
                interceptors=list(tracing.client_interceptors()) or None,
            )
            self._channels[address] = channel
            stub = self._stubs[address] = workspaces_pb2_grpc.WorkspaceServiceStub(channel)
        return stub

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))
        self._channels.clear()
        self._stubs.clear()
