"""The server interceptor chain: request id, signed-actor verification, request
decoding, logging, metrics and the one place where project errors become gRPC status.

Health and reflection calls pass through untouched: load balancers and grpcurl
call them without an actor.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeAlias

import grpc
import grpc.aio
from prometheus_client import Counter, Histogram
from sqlalchemy.exc import DBAPIError

from common import tracing
from common.actor import Actor, verify_actor
from common.db import translate_db_error
from common.errors import Internal, PaperclipError, WireStatus, to_wire_status
from common.metrics import count_refusal
from common.request_context import CURRENT_ACTOR, REQUEST_ID
from common.request_decoding import check_request, tolerant

log = logging.getLogger("paperclip.rpc")

REQUEST_ID_HEADER = "x-request-id"
_OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

RPC_TOTAL = Counter("paperclip_rpc_total", "RPCs served", ["method", "code"])
RPC_SECONDS = Histogram("paperclip_rpc_seconds", "RPC latency", ["method"])

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Unary = Callable[[Any, Context], Awaitable[Any]]
Streaming = Callable[[Any, Context], AsyncIterator[Any]]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class Authenticator(Protocol):
    """Turns the metadata of a call into its verified actor, or raises Unauthenticated."""

    async def authenticate(self, metadata: Mapping[str, str]) -> Actor: ...


class SignedActorAuthenticator:
    """Services trust only an actor signed with the internal key (docs/architecture.md)."""

    def __init__(self, internal_key: bytes) -> None:
        self._key = internal_key

    async def authenticate(self, metadata: Mapping[str, str]) -> Actor:
        return verify_actor(metadata, self._key)


class _Call:
    """Book-keeping of one call: its id, outcome and timing."""

    def __init__(self, method: str, metadata: Mapping[str, str]) -> None:
        self.method = method
        self.started = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.request_id = (
            (tracing.ENABLED and tracing.current_trace_id())
            or metadata.get(REQUEST_ID_HEADER)
            or uuid.uuid4().hex
        )
        REQUEST_ID.set(self.request_id)

    def failure(self, exc: BaseException) -> WireStatus:
        """The status to send for ``exc``; unexpected errors are logged with a trace."""
        mapped: BaseException = translate_db_error(exc) if isinstance(exc, DBAPIError) else exc
        if isinstance(mapped, PaperclipError):
            error = mapped
            log.info("rpc refused", extra={"method": self.method, "reason": error.reason})
            count_refusal(error.reason)
        else:
            log.error("rpc failed", exc_info=exc, extra={"method": self.method})
            error = Internal("internal error")
        self.code = error.code
        return to_wire_status(error, ((REQUEST_ID_HEADER, self.request_id),))

    def finish(self) -> None:
        elapsed = time.perf_counter() - self.started
        RPC_TOTAL.labels(self.method, self.code.name).inc()
        RPC_SECONDS.labels(self.method).observe(elapsed)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "rpc",
                extra={"method": self.method, "code": self.code.name, "ms": elapsed * 1000},
            )


async def _open(method: str, context: Context, auth: Authenticator) -> _Call | WireStatus:
    metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
    call = _Call(method, metadata)
    try:
        CURRENT_ACTOR.set(await auth.authenticate(metadata))
    except Exception as exc:  # authentication must never answer UNKNOWN
        error = call.failure(exc)
        RPC_TOTAL.labels(method, error.code.name).inc()
        return error
    return call


def _wrap_unary(behavior: Unary, method: str, auth: Authenticator) -> Unary:
    async def handler(request: Any, context: Context) -> Any:
        call = await _open(method, context, auth)
        if isinstance(call, WireStatus):
            await context.abort_with_status(call)
            return None
        try:
            check_request(request)
            response = await behavior(request, context)
            context.set_trailing_metadata(((REQUEST_ID_HEADER, call.request_id),))
            return response
        except grpc.aio.AbortError:
            call.code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except Exception as exc:  # the one mapping point for every error
            await context.abort_with_status(call.failure(exc))
        finally:
            call.finish()

    return handler


def _wrap_stream(behavior: Streaming, method: str, auth: Authenticator) -> Streaming:
    async def handler(request: Any, context: Context) -> AsyncIterator[Any]:
        call = await _open(method, context, auth)
        if isinstance(call, WireStatus):
            await context.abort_with_status(call)
            return
        try:
            check_request(request)
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            call.code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except Exception as exc:
            await context.abort_with_status(call.failure(exc))
        finally:
            call.finish()

    return handler


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates the caller, refuses requests that do not decode (see
    ``common.request_decoding``) and maps errors for every non-health RPC."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator
        #: The wrapped handler of each method, with the handler it wraps: servers hand
        #: out the same handler object for a method on every call, so it is built once.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(_OPEN_PREFIXES):
            return handler
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: Any, method: str) -> Handler:
        deserializer = handler.request_deserializer
        if deserializer is not None:
            # Decoding failures reach the handler, which answers INVALID_ARGUMENT: a
            # deserializer that raised would answer UNKNOWN before any of this runs.
            deserializer = tolerant(deserializer, method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, self._auth),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, self._auth),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # type: ignore[no-any-return]
