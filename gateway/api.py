"""gRPC entrypoint of paperclip.gateway.v1.AuthService."""

from __future__ import annotations

from common.db import Database
from common.interceptors import Context
from common.request_context import current_actor
from gateway import accounts
from paperclip.gateway.v1 import auth_pb2, auth_pb2_grpc


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    """WhoAmI, and board keys for instance admins."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def WhoAmI(self, request: auth_pb2.WhoAmIRequest, context: Context) -> auth_pb2.Actor:
        return accounts.actor_to_proto(current_actor())

    async def CreateApiKey(
        self, request: auth_pb2.CreateApiKeyRequest, context: Context
    ) -> auth_pb2.CreateApiKeyResponse:
        return await accounts.create_api_key(self.db, current_actor(), request)

    async def RevokeApiKey(
        self, request: auth_pb2.RevokeApiKeyRequest, context: Context
    ) -> auth_pb2.ApiKey:
        return await accounts.revoke_api_key(self.db, current_actor(), request)
