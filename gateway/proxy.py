"""The routing proxy: forwards each public call, as opaque bytes, to its backend.

The verified actor goes along signed with the internal key; nothing the client sent
about its identity does. Deadlines are passed on (a default when the caller set none),
a cancelled call is cancelled at the backend, and the backend's status, message and
error details come back untouched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
import grpc.aio

from common.actor import sign_actor
from common.interceptors import REQUEST_ID_HEADER, Context
from common.request_context import REQUEST_ID, current_actor
from gateway.routes import Route

#: Deadlines the gateway sets when the caller sets none, so no backend work waits
#: forever on a client that went away.
DEFAULT_UNARY_TIMEOUT_S = 30.0
#: Streams, and unary calls that run commands (``routes.LONG_RUNNING_METHODS``).
DEFAULT_STREAM_TIMEOUT_S = 3600.0

_Handler = Callable[[bytes, Context], Any]


def _passthrough(value: bytes) -> bytes:
    return value


class Proxy(grpc.GenericRpcHandler):
    """A generic handler answering every routed method."""

    def __init__(
        self,
        routes: Mapping[str, Route],
        channels: Mapping[str, grpc.aio.Channel],
        internal_key: bytes,
    ) -> None:
        self._key = internal_key
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for path, route in routes.items():
            channel = channels[route.backend]
            if route.server_streaming:
                stream = channel.unary_stream(
                    path, request_serializer=_passthrough, response_deserializer=_passthrough
                )
                self._handlers[path] = grpc.unary_stream_rpc_method_handler(self._streaming(stream))
            else:
                unary = channel.unary_unary(
                    path, request_serializer=_passthrough, response_deserializer=_passthrough
                )
                self._handlers[path] = grpc.unary_unary_rpc_method_handler(
                    self._unary(unary, long_running=route.long_running)
                )

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self._handlers.get(handler_call_details.method)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (*sign_actor(current_actor(), self._key), (REQUEST_ID_HEADER, REQUEST_ID.get()))

    def _unary(
        self,
        multicallable: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes],
        *,
        long_running: bool,
    ) -> _Handler:
        async def forward(request: bytes, context: Context) -> bytes:
            timeout = context.time_remaining()
            if timeout is None:
                timeout = DEFAULT_STREAM_TIMEOUT_S if long_running else DEFAULT_UNARY_TIMEOUT_S
            call = multicallable(
                request,
                metadata=self._metadata(),
                timeout=timeout,
            )
            try:
                return await call
            except grpc.aio.AioRpcError as err:
                await _relay(context, err)
                raise
            finally:
                if not call.done():
                    call.cancel()

        return forward

    def _streaming(
        self, multicallable: grpc.aio.UnaryStreamMultiCallable[bytes, bytes]
    ) -> Callable[[bytes, Context], AsyncIterator[bytes]]:
        async def forward(request: bytes, context: Context) -> AsyncIterator[bytes]:
            timeout = context.time_remaining()
            call = multicallable(
                request,
                metadata=self._metadata(),
                timeout=DEFAULT_STREAM_TIMEOUT_S if timeout is None else timeout,
            )
            try:
                async for message in call:
                    yield message
            except grpc.aio.AioRpcError as err:
                await _relay(context, err)
                raise
            finally:
                if not call.done():
                    call.cancel()

        return forward


async def _relay(context: Context, err: grpc.aio.AioRpcError) -> None:
    """End the client's call with the backend's status, untouched (details included),
    and the call's request id (the client's, or the one the gateway gave it): the
    backend's echo is replaced, so there is exactly one even when no backend answered."""
    trailing = (
        *(
            (key, value)
            for key, value in (err.trailing_metadata() or ())
            if key != REQUEST_ID_HEADER
        ),
        (REQUEST_ID_HEADER, REQUEST_ID.get()),
    )
    await context.abort(err.code(), err.details() or "", trailing_metadata=trailing)
