"""Tracing across the services with OpenTelemetry, exported over OTLP when
``PAPERCLIP_OTLP_ENDPOINT`` is set and off otherwise.

When on, every RPC a process serves is a server span, continuing the W3C
``traceparent`` of the caller's metadata (the gateway starts a trace when a client
sends none); every call to another service of the suite is a client span whose
``traceparent`` goes along in the call's metadata; every SQL statement of a unit of
work is a span (``db.system``, the statement text, never its parameters). Spans about
a run carry its id as ``paperclip.run_id``: RPCs whose request or caller names a run,
and the run service's steps for a run (:func:`run_span`).

Client and SQL spans are made only inside a span being recorded: background loops
(dispatch polls, sweeps) record nothing until they call a service or start a
``run_span``.

When off, no tracer provider is installed and no interceptor is added to servers or
channels (:func:`server_interceptors`, :func:`client_interceptors` are empty); what
stays in the hot paths is one check of :data:`ENABLED` per call and per unit of work.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import asyncpg
import grpc
import grpc.aio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from common.request_context import CURRENT_ACTOR

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from common.config import Settings

#: True while spans are recorded; read as ``tracing.ENABLED`` at each use.
ENABLED = False
RUN_ID_ATTRIBUTE = "paperclip.run_id"
TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"

_tracer: Tracer = trace.NoOpTracer()
_PROPAGATOR = TraceContextTextMapPropagator()
#: Balancers' health checks and grpcurl's reflection calls are not traced.
_UNTRACED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
#: Server-side codes that mean the server failed (the others are the caller's doing).
_SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


# --- setup ---------------------------------------------------------------------------


def setup_tracing(settings: Settings, service: str) -> None:
    """Export spans to ``settings.otlp_endpoint`` (OTLP over gRPC) when it is set."""
    if not settings.otlp_endpoint:
        return
    provider = otlp_provider(settings.otlp_endpoint, service)
    trace.set_tracer_provider(provider)
    enable(provider)


def otlp_provider(endpoint: str, service: str) -> TracerProvider:
    """A tracer provider batching spans of ``service`` to the collector at ``endpoint``
    (``http://`` is plaintext, ``https://`` TLS). The SDK flushes it at exit."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


def enable(provider: trace.TracerProvider) -> None:
    """Record spans with ``provider`` from now on (tests install an in-memory one).

    Servers and channels made before this call carry no tracing interceptor."""
    global ENABLED, _tracer  # noqa: PLW0603
    _tracer = provider.get_tracer("paperclip")
    ENABLED = True


def disable() -> None:
    """Stop recording spans; interceptors already installed pass calls through."""
    global ENABLED, _tracer  # noqa: PLW0603
    ENABLED = False
    _tracer = trace.NoOpTracer()


def current_trace_id() -> str:
    """The trace id (32 hex digits) of the span being recorded, or ``""``."""
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""


def _recording() -> bool:
    return ENABLED and trace.get_current_span().is_recording()


def _run_id_of(request: object) -> str:
    """The run a call is about: its request's ``run_id``, else the caller's run."""
    run_id = getattr(request, "run_id", "")
    if isinstance(run_id, str) and run_id:
        return run_id
    actor = CURRENT_ACTOR.get()
    return (actor.run_id or "") if actor is not None else ""


def _rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _end(span: Span, code: grpc.StatusCode, run_id: str, *, fault: bool) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if run_id:
        span.set_attribute(RUN_ID_ATTRIBUTE, run_id)
    if fault:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


# --- run steps -----------------------------------------------------------------------


@contextlib.contextmanager
def _run_span(name: str, run_id: str) -> Iterator[None]:
    with _tracer.start_as_current_span(name, attributes={RUN_ID_ATTRIBUTE: run_id}):
        yield


def run_span(name: str, run_id: str) -> contextlib.AbstractContextManager[None]:
    """A span of work for ``run_id`` (current while it lasts); nothing when off."""
    return _run_span(name, run_id) if ENABLED else contextlib.nullcontext()


@contextlib.contextmanager
def _agent_process_span(run_id: str) -> Iterator[dict[str, str]]:
    with _tracer.start_as_current_span("run.agent", attributes={RUN_ID_ATTRIBUTE: run_id}) as span:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        yield {name.upper(): value for name, value in carrier.items()}


def agent_process_span(run_id: str) -> contextlib.AbstractContextManager[dict[str, str]]:
    """The span of a run's agent process, current from its spawn to the run's terminal
    write, and the environment that hands it to the process: ``TRACEPARENT`` (and
    ``TRACESTATE``), OpenTelemetry's environment carrier, which the typed client sends
    with every call so that the agent's calls continue the run's trace. Nothing (an
    empty environment) when off."""
    return _agent_process_span(run_id) if ENABLED else contextlib.nullcontext({})


# --- server spans --------------------------------------------------------------------


def server_interceptors() -> tuple[grpc.aio.ServerInterceptor, ...]:
    """What a server adds in front of its other interceptors: nothing when off."""
    return (ServerTracing(),) if ENABLED else ()


class ServerTracing(grpc.aio.ServerInterceptor):
    """Makes every served call (health and reflection aside) a server span, current
    while the call's handler runs, so the request id and child spans see it."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not ENABLED or method.startswith(_UNTRACED_PREFIXES):
            return handler
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = _wrap_server_handler(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _wrap_server_handler(handler: Any, method: str) -> Handler:
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _traced_unary(handler.unary_unary, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _traced_stream(handler.unary_stream, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler  # type: ignore[no-any-return]


def _start_server_span(method: str, context: Context) -> Span:
    carrier = {
        key: value
        for key, value in context.invocation_metadata() or ()
        if key in (TRACEPARENT_HEADER, TRACESTATE_HEADER) and isinstance(value, str)
    }
    parent = _PROPAGATOR.extract(carrier) if carrier else None
    return _tracer.start_span(
        method.lstrip("/"), context=parent, kind=SpanKind.SERVER, attributes=_rpc_attributes(method)
    )


def _server_code(context: Context, exc: BaseException | None) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if exc is None:
        return grpc.StatusCode.OK
    if not isinstance(exc, Exception):
        return grpc.StatusCode.CANCELLED  # CancelledError: the caller went away
    return grpc.StatusCode.UNKNOWN


def _finish_server(span: Span, context: Context, request: Any, exc: BaseException | None) -> None:
    code = _server_code(context, exc)
    _end(span, code, _run_id_of(request), fault=code in _SERVER_FAULTS)


def _traced_unary(
    behavior: Callable[[Any, Context], Awaitable[Any]], method: str
) -> Callable[[Any, Context], Awaitable[Any]]:
    async def handler(request: Any, context: Context) -> Any:
        if not ENABLED:
            return await behavior(request, context)
        span = _start_server_span(method, context)
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            response = await behavior(request, context)
        except BaseException as exc:
            _finish_server(span, context, request, exc)
            raise
        finally:
            otel_context.detach(token)
        _finish_server(span, context, request, None)
        return response

    return handler


def _traced_stream(
    behavior: Callable[[Any, Context], AsyncIterator[Any]], method: str
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    async def handler(request: Any, context: Context) -> AsyncIterator[Any]:
        if not ENABLED:
            async for item in behavior(request, context):
                yield item
            return
        span = _start_server_span(method, context)
        # The call's own task serves the stream to its end: the span stays current in
        # that task's context, as the request id does (no detach across yields).
        otel_context.attach(trace.set_span_in_context(span))
        try:
            async for item in behavior(request, context):
                yield item
        except BaseException as exc:
            _finish_server(span, context, request, exc)
            raise
        _finish_server(span, context, request, None)

    return handler


# --- client spans --------------------------------------------------------------------


def client_interceptors() -> tuple[grpc.aio.ClientInterceptor, ...]:
    """What a channel to another service adds to its interceptors: nothing when off."""
    return (UnaryClientTracing(), StreamClientTracing()) if ENABLED else ()


# A channel files each interceptor under the first kind of call it handles: one class
# per kind.
class UnaryClientTracing(grpc.aio.UnaryUnaryClientInterceptor):
    """Makes each unary call made inside a recorded span a client span, and sends its
    ``traceparent`` along in the call's metadata."""

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await _traced_call(continuation, client_call_details, request)


class StreamClientTracing(grpc.aio.UnaryStreamClientInterceptor):
    """:class:`UnaryClientTracing` for server-streaming calls."""

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await _traced_call(continuation, client_call_details, request)


async def _traced_call(continuation: Callable[..., Any], details: Any, request: Any) -> Any:
    if not _recording():
        return await continuation(details, request)
    raw = details.method
    method = raw.decode() if isinstance(raw, bytes) else str(raw)
    span = _tracer.start_span(
        method.lstrip("/"), kind=SpanKind.CLIENT, attributes=_rpc_attributes(method)
    )
    run_id = _run_id_of(request)
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    metadata = grpc.aio.Metadata(
        *(
            (key, value)
            for key, value in (details.metadata or ())
            if key not in (TRACEPARENT_HEADER, TRACESTATE_HEADER)
        ),
        *carrier.items(),
    )
    try:
        call = await continuation(details._replace(metadata=metadata), request)
    except BaseException:
        _end(span, grpc.StatusCode.UNKNOWN, run_id, fault=True)
        raise
    call.add_done_callback(lambda done: _finish_client(span, done, run_id))
    return call


def _finish_client(span: Span, call: Any, run_id: str) -> None:
    code = _code_of_done(call)
    _end(span, code, run_id, fault=code != grpc.StatusCode.OK)


def _code_of_done(call: Any) -> grpc.StatusCode:
    """The status of a finished call, read without waiting (it is known by now)."""
    if call.cancelled():
        return grpc.StatusCode.CANCELLED
    pending = call.code()
    try:
        pending.send(None)
    except StopIteration as finished:
        return cast(grpc.StatusCode, finished.value)
    except Exception:
        return grpc.StatusCode.UNKNOWN
    pending.close()
    return grpc.StatusCode.UNKNOWN


# --- SQL spans -----------------------------------------------------------------------


def sql_connection(conn: asyncpg.Connection) -> asyncpg.Connection:
    """``conn`` itself, or inside a recorded span a stand-in that makes each statement
    a span; everything else (savepoints, listeners) goes to ``conn``."""
    if not _recording():
        return conn
    return cast(asyncpg.Connection, _TracedConnection(conn))


class _TracedConnection:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        with sql_span(query):
            return await self._conn.fetchrow(query, *args, **kwargs)

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> Any:
        with sql_span(query):
            return await self._conn.fetch(query, *args, **kwargs)

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        with sql_span(query):
            return await self._conn.fetchval(query, *args, **kwargs)

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> Any:
        with sql_span(query):
            return await self._conn.execute(query, *args, **kwargs)

    async def executemany(self, query: str, *args: Any, **kwargs: Any) -> Any:
        with sql_span(query):
            return await self._conn.executemany(query, *args, **kwargs)


def _operation(statement: str) -> str:
    words = statement.split(None, 1)
    return words[0].upper() if words else "SQL"


def sql_span(statement: str) -> contextlib.AbstractContextManager[Span]:
    """A span for one SQL statement (its text, no parameters), current while it runs."""
    return _tracer.start_as_current_span(
        _operation(statement),
        kind=SpanKind.CLIENT,
        attributes={"db.system": "postgresql", "db.statement": statement},
    )
