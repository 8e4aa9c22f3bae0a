"""Tracing with real servers on real sockets: spans are collected in memory (the SDK's
in-memory exporter) from a gateway, an issue service and a run service with its runner,
all started in this process after the tracer provider is installed.

One checkout through the gateway is one trace: gateway server span -> gateway client
span -> issue service server span -> its SQL statements; a caller's ``traceparent`` is
continued; a run's spans carry its id; the request id is the trace id. With tracing
off nothing is recorded and the request id is the caller's ``x-request-id`` or a new
one, as before.
"""

from __future__ import annotations

import asyncio
import re
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from common import tracing
from common.config import Settings, load_settings
from common.db import Database
from common.interceptors import REQUEST_ID_HEADER
from common.run_tokens import mint_run_token
from common.server import RunningServer, start_server
from common.sql import sql
from gateway.app import Gateway, start_gateway
from issue_service.app import service_specs as issue_specs
from paperclip.issues.v1 import issues_pb2
from paperclip.runs.v1 import agents_pb2, runs_pb2
from run_service.app import service_specs as run_specs
from run_service.runner import Runner
from tests.gateway.conftest import (
    Caller,
    bearer,
    create_admin_key,
    gateway_settings,
    open_caller,
    wait_serving,
)
from tests.harness import INTERNAL_KEY, insert_run, unique_prefix
from tests.waiting import wait_until

AGENTS = Path(__file__).resolve().parents[1] / "agents"
CHECKOUT = "paperclip.issues.v1.IssueService/CheckoutIssue"
GET_RUN = "paperclip.runs.v1.RunService/GetRun"
WATCH_RUN = "paperclip.runs.v1.RunService/WatchRun"
TERMINAL = ("succeeded", "failed", "cancelled", "timed_out")


def test_settings_without_endpoint_install_nothing() -> None:
    settings = load_settings({"PAPERCLIP_INTERNAL_KEY": "k", "PAPERCLIP_JWT_SECRET": "s"})
    assert settings.otlp_endpoint is None
    tracing.setup_tracing(settings, "test")
    assert not tracing.ENABLED
    assert tracing.server_interceptors() == ()
    assert tracing.client_interceptors() == ()
    # No SDK provider was installed: the API's default proxy is still in place.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    endpoint = load_settings(
        {
            "PAPERCLIP_INTERNAL_KEY": "k",
            "PAPERCLIP_JWT_SECRET": "s",
            "PAPERCLIP_OTLP_ENDPOINT": " http://collector:4317 ",
        }
    ).otlp_endpoint
    assert endpoint == "http://collector:4317"


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_otlp_provider_exports_to_the_endpoint() -> None:
    collector = _Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    provider = tracing.otlp_provider(f"http://127.0.0.1:{port}", "issue_service")
    try:
        provider.get_tracer("test").start_span("exported").end()
        assert await asyncio.to_thread(provider.force_flush, 10_000)
    finally:
        await asyncio.to_thread(provider.shutdown)
        await server.stop(0)
    [request] = collector.requests
    [resource_spans] = request.resource_spans
    service_names = [
        a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"
    ]
    assert service_names == ["issue_service"]
    assert [s.name for ss in resource_spans.scope_spans for s in ss.spans] == ["exported"]


@dataclass
class Traced:
    """The traced suite of this module and the spans it recorded."""

    exporter: InMemorySpanExporter
    provider: TracerProvider
    gateway_address: str
    settings: Settings
    db: Database
    runner: Runner
    admin: Caller
    admin_token: str
    callers: list[Caller]

    def caller(self, token: str, *extra: tuple[str, str]) -> Caller:
        caller = open_caller(self.gateway_address, (*bearer(token), *extra))
        self.callers.append(caller)
        return caller

    def spans(self) -> Sequence[ReadableSpan]:
        return self.exporter.get_finished_spans()


@pytest.fixture(scope="module")
async def traced(database_url: str, db: Database) -> AsyncIterator[Traced]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    settings = gateway_settings(database_url, PAPERCLIP_DISPATCH_POLL_MS="200")
    issue_db = Database(database_url, pool_size=5, max_overflow=5, name="issue_service")
    run_db = Database(database_url, pool_size=5, max_overflow=5, name="run_service")
    gateway_db = Database(database_url, pool_size=5, max_overflow=5, name="gateway")
    servers: list[RunningServer] = []
    gateway: Gateway | None = None
    runner_task: asyncio.Task[None] | None = None
    runner: Runner | None = None
    env: Traced | None = None
    try:
        issue_server = await start_server(
            issue_specs(issue_db, settings), "127.0.0.1:0", INTERNAL_KEY
        )
        servers.append(issue_server)
        issue_addr = f"127.0.0.1:{issue_server.port}"
        # No workspace service here: its calls answer UNIMPLEMENTED (logged, not fatal).
        run_settings = replace(
            settings, issue_service_addr=issue_addr, workspace_service_addr=issue_addr
        )
        runner = Runner(run_db, run_settings, companies=set())
        run_server = await start_server(run_specs(run_db, runner), "127.0.0.1:0", INTERNAL_KEY)
        servers.append(run_server)
        runner_task = asyncio.create_task(runner.run(), name="traced-runner")
        await runner.wait_registered()
        backends = {
            "issue_service": issue_addr,
            "run_service": f"127.0.0.1:{run_server.port}",
            "workspace_service": issue_addr,
        }
        gateway = await start_gateway(
            gateway_db, settings, address="127.0.0.1:0", backends=backends
        )
        address = f"127.0.0.1:{gateway.running.port}"
        await wait_serving(address)
        # The agents this runner starts reach this gateway.
        runner.settings = replace(runner.settings, gateway_addr=address)
        admin_token = await create_admin_key(db, f"trace-{uuid.uuid4()}")
        admin = open_caller(address, bearer(admin_token))
        env = Traced(exporter, provider, address, settings, db, runner, admin, admin_token, [admin])
        yield env
    finally:
        tracing.disable()
        for caller in env.callers if env is not None else ():
            await caller.channel.close()
        if runner_task is not None:
            runner_task.cancel()
            await asyncio.gather(runner_task, return_exceptions=True)
        if runner is not None:
            await runner.stop()
        if gateway is not None:
            await gateway.stop(0.5)
        await asyncio.gather(*(s.stop(0.5) for s in servers))
        for database in (issue_db, run_db, gateway_db):
            await database.dispose()
        provider.shutdown()


@dataclass
class CheckoutWorld:
    company_id: str
    agent_id: str
    issue_id: str
    run_id: str
    token: str


async def _agent(env: Traced, company_id: str, script: str) -> agents_pb2.Agent:
    """An agent of ``company_id`` running ``tests/agents/<script>``."""
    return await env.admin.runs.CreateAgent(
        agents_pb2.CreateAgentRequest(
            company_id=company_id,
            name=f"agent-{unique_prefix().lower()}",
            role="engineer",
            adapter_type="process",
            adapter_config=agents_pb2.AdapterConfig(command=[sys.executable, str(AGENTS / script)]),
        )
    )


async def _todo_issue(env: Traced, company_id: str, agent_id: str, title: str) -> issues_pb2.Issue:
    return await env.admin.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(
            company_id=company_id,
            title=title,
            assignee_agent_id=agent_id,
            status=issues_pb2.ISSUE_STATUS_TODO,
        )
    )


async def _run_to_its_end(env: Traced, company_id: str, run_id: str) -> None:
    """Let the runner dispatch ``company_id`` until the queued ``run_id`` has ended."""
    companies = env.runner.companies
    assert companies is not None
    companies.add(company_id)
    try:
        await wait_until(lambda: _run_status(env.db, run_id), within=30, what="the run to end")
    finally:
        companies.discard(company_id)


async def _checkout_world(env: Traced) -> CheckoutWorld:
    company = await env.admin.issues.CreateCompany(
        issues_pb2.CreateCompanyRequest(name="Traced", issue_prefix=unique_prefix())
    )
    agent = await _agent(env, company.id, "succeed.py")
    issue = await _todo_issue(env, company.id, agent.id, "Trace me")
    run_id = await insert_run(env.db, company_id=company.id, agent_id=agent.id)
    token = mint_run_token(
        env.settings.jwt_secret, agent_id=agent.id, company_id=company.id, run_id=run_id
    )
    return CheckoutWorld(company.id, agent.id, issue.id, run_id, token)


async def _checkout(caller: Caller, world: CheckoutWorld) -> str:
    """Check the issue out as the run; the request id the gateway answered with."""
    call = caller.issues.CheckoutIssue(
        issues_pb2.CheckoutIssueRequest(
            issue_id=world.issue_id,
            agent_id=world.agent_id,
            expected_statuses=[issues_pb2.ISSUE_STATUS_TODO],
        )
    )
    out = await call
    assert out.checkout_run_id == world.run_id
    trailing = dict(await call.trailing_metadata() or ())
    request_id = trailing[REQUEST_ID_HEADER]
    assert isinstance(request_id, str)
    return request_id


def _one(spans: Sequence[ReadableSpan], name: str, kind: SpanKind, parent: int | None) -> Any:
    found = [
        s
        for s in spans
        if s.name == name
        and s.kind == kind
        and (s.parent.span_id if s.parent is not None else None) == parent
    ]
    assert len(found) == 1, [(s.name, s.kind, s.parent) for s in spans]
    return found[0]


def _children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    parent_id = parent.context.span_id if parent.context is not None else None
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent_id]


async def _spans_settled(env: Traced, name: str, count: int) -> Sequence[ReadableSpan]:
    """The finished spans once ``count`` spans named ``name`` are among them (a client
    span ends in its call's done callback, a moment after the reply)."""

    def enough() -> bool:
        return sum(1 for s in env.spans() if s.name == name) >= count

    await wait_until(enough, within=10, what=f"{count} spans named {name}")
    return env.spans()


async def test_checkout_is_one_trace_from_the_gateway_to_sql(traced: Traced) -> None:
    world = await _checkout_world(traced)
    caller = traced.caller(world.token)
    traced.exporter.clear()

    request_id = await _checkout(caller, world)

    spans = await _spans_settled(traced, CHECKOUT, 3)
    gateway_server = _one(spans, CHECKOUT, SpanKind.SERVER, None)
    trace_id = gateway_server.context.trace_id
    gateway_client = _one(spans, CHECKOUT, SpanKind.CLIENT, gateway_server.context.span_id)
    issue_server = _one(spans, CHECKOUT, SpanKind.SERVER, gateway_client.context.span_id)
    statements = [s for s in _children(spans, issue_server) if s.attributes is not None]
    assert statements, "the issue service's statements are spans under its server span"
    for span in (gateway_client, issue_server, *statements):
        assert span.context.trace_id == trace_id
    for statement in statements:
        assert statement.attributes is not None
        assert statement.attributes["db.system"] == "postgresql"
        text = str(statement.attributes["db.statement"])
        assert world.issue_id not in text and world.run_id not in text  # no parameters
    assert any("issues.issues" in str((s.attributes or {}).get("db.statement")) for s in statements)
    # The caller's run is on the spans of its call, at the gateway and at the service.
    for span in (gateway_server, gateway_client, issue_server):
        assert span.attributes[tracing.RUN_ID_ATTRIBUTE] == world.run_id
        assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    # The request id in logs and in the answer is the trace id.
    assert request_id == format(trace_id, "032x")


async def test_caller_traceparent_is_continued(traced: Traced) -> None:
    world = await _checkout_world(traced)
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    caller = traced.caller(world.token, ("traceparent", f"00-{trace_id}-{parent_id}-01"))
    traced.exporter.clear()

    request_id = await _checkout(caller, world)

    spans = await _spans_settled(traced, CHECKOUT, 3)
    gateway_server = _one(spans, CHECKOUT, SpanKind.SERVER, int(parent_id, 16))
    assert format(gateway_server.context.trace_id, "032x") == trace_id
    assert gateway_server.parent.is_remote
    assert {format(s.context.trace_id, "032x") for s in spans if s.name == CHECKOUT} == {trace_id}
    assert request_id == trace_id


async def test_refused_call_spans_carry_its_status(traced: Traced) -> None:
    world = await _checkout_world(traced)
    caller = traced.caller(world.token)
    traced.exporter.clear()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await caller.issues.CheckoutIssue(
            issues_pb2.CheckoutIssueRequest(
                issue_id=world.issue_id,
                agent_id=world.agent_id,
                expected_statuses=[issues_pb2.ISSUE_STATUS_DONE],
            )
        )
    code = refused.value.code()
    assert code != grpc.StatusCode.OK
    spans = await _spans_settled(traced, CHECKOUT, 3)
    checkout = [s for s in spans if s.name == CHECKOUT]
    assert [(s.attributes or {}).get("rpc.grpc.status_code") for s in checkout] == [
        code.value[0]
    ] * 3
    # The caller's doing: an error at the client end only, not a server fault.
    errors = sorted(s.kind.name for s in checkout if s.status.status_code.name == "ERROR")
    assert errors == ["CLIENT"]


async def test_run_spans_carry_the_run_id(traced: Traced) -> None:
    world = await _checkout_world(traced)
    traced.exporter.clear()
    run_id = await _queue_run(traced.db, world.company_id, world.agent_id)
    await _run_to_its_end(traced, world.company_id, run_id)

    spans = await _spans_settled(traced, "run.finalize", 1)
    [terminal] = [s for s in spans if s.name == "run.finalize"]
    assert terminal.attributes is not None
    assert terminal.attributes[tracing.RUN_ID_ATTRIBUTE] == run_id
    writes = _children(spans, terminal)
    assert any("heartbeat_runs" in str((s.attributes or {}).get("db.statement")) for s in writes), (
        "the terminal write's statements are spans under it"
    )
    assert all(s.context.trace_id == terminal.context.trace_id for s in writes)

    # An RPC whose request names a run carries its id at the service.
    traced.exporter.clear()
    await traced.admin.runs.GetRun(runs_pb2.GetRunRequest(run_id=run_id))
    spans = await _spans_settled(traced, GET_RUN, 3)
    served = [s for s in spans if s.name == GET_RUN and s.kind == SpanKind.SERVER]
    at_service = [s for s in served if s.parent is not None]
    assert [(s.attributes or {}).get(tracing.RUN_ID_ATTRIBUTE) for s in at_service] == [run_id]

    # A stream too: every span of the watch, at both ends of both hops, ends OK.
    traced.exporter.clear()
    watch_call = traced.admin.runs.WatchRun(runs_pb2.WatchRunRequest(run_id=run_id))
    events = [event async for event in watch_call]
    assert events
    spans = await _spans_settled(traced, WATCH_RUN, 3)
    watch = [s for s in spans if s.name == WATCH_RUN]
    assert sorted(s.kind.name for s in watch) == ["CLIENT", "SERVER", "SERVER"]
    assert {(s.attributes or {}).get("rpc.grpc.status_code") for s in watch} == {0}
    assert len({s.context.trace_id for s in watch}) == 1
    [watched] = [s for s in watch if s.kind == SpanKind.SERVER and s.parent is not None]
    assert (watched.attributes or {}).get(tracing.RUN_ID_ATTRIBUTE) == run_id


async def test_an_agents_calls_continue_its_runs_trace(traced: Traced) -> None:
    """The run service hands its agent the run's span (``TRACEPARENT``); the typed client
    sends it, so the agent's calls are that span's children at the gateway."""
    world = await _checkout_world(traced)
    worker = await _agent(traced, world.company_id, "worker.py")
    issue = await _todo_issue(traced, world.company_id, worker.id, "Work it, traced")
    traced.exporter.clear()
    run_id = await _queue_run(traced.db, world.company_id, worker.id, issue.id)
    await _run_to_its_end(traced, world.company_id, run_id)
    done = await traced.admin.issues.GetIssue(issues_pb2.GetIssueRequest(issue=issue.id))
    assert done.status == issues_pb2.ISSUE_STATUS_DONE, "the worker did its issue's work"

    spans = await _spans_settled(traced, "run.agent", 1)
    [agent_span] = [
        s
        for s in spans
        if s.name == "run.agent" and (s.attributes or {}).get(tracing.RUN_ID_ATTRIBUTE) == run_id
    ]
    agent_ctx = agent_span.context
    children = [s for s in spans if s.parent is not None and s.parent.span_id == agent_ctx.span_id]
    calls = [s for s in children if s.kind == SpanKind.SERVER]
    assert {s.name for s in calls} == {
        CHECKOUT,
        "paperclip.issues.v1.IssueService/AddComment",
        "paperclip.issues.v1.IssueService/UpdateIssue",
    }
    for call in calls:
        assert call.context.trace_id == agent_ctx.trace_id
        assert call.parent is not None and call.parent.is_remote
        assert (call.attributes or {}).get(tracing.RUN_ID_ATTRIBUTE) == run_id
    # The run's own steps after the spawn are in the same trace.
    [finalize] = [
        s
        for s in spans
        if s.name == "run.finalize" and (s.attributes or {}).get(tracing.RUN_ID_ATTRIBUTE) == run_id
    ]
    assert finalize.parent is not None and finalize.parent.span_id == agent_ctx.span_id


async def test_tracing_off_records_nothing_and_keeps_request_ids(traced: Traced) -> None:
    world = await _checkout_world(traced)
    tracing.disable()
    try:
        traced.exporter.clear()
        given = f"req-{uuid.uuid4().hex}"
        assert await _checkout(traced.caller(world.token, (REQUEST_ID_HEADER, given)), world) == (
            given
        )
        await traced.admin.issues.ReleaseIssue(
            issues_pb2.ReleaseIssueRequest(issue_id=world.issue_id)
        )
        # Released by the board: the run may check the issue out again, with no id given.
        fresh = await _checkout(traced.caller(world.token), world)
        assert re.fullmatch(r"[0-9a-f]{32}", fresh) and fresh != given
        await asyncio.sleep(0.2)
        assert traced.spans() == ()
        assert tracing.server_interceptors() == ()
        assert tracing.client_interceptors() == ()
    finally:
        tracing.enable(traced.provider)


async def _queue_run(
    db: Database, company_id: str, agent_id: str, issue_id: str | None = None
) -> str:
    """A queued wake and its queued run (on ``issue_id``), as WakeAgent writes them; the
    run id."""
    async with db.unit_of_work() as tx:
        wake = await tx.fetchval(
            sql(
                """
                INSERT INTO runs.wakeup_requests
                    (company_id, agent_id, issue_id, source, reason, status)
                VALUES (:c, :a, :i, 'on_demand', 'trace test', 'queued') RETURNING id
                """
            ),
            {"c": company_id, "a": agent_id, "i": issue_id},
        )
        run = await tx.fetchval(
            sql(
                """
                INSERT INTO runs.heartbeat_runs
                    (company_id, agent_id, issue_id, status, invocation_source, wake_reason,
                     wakeup_request_id)
                VALUES (:c, :a, :i, 'queued', 'on_demand', 'trace test', :w) RETURNING id
                """
            ),
            {"c": company_id, "a": agent_id, "i": issue_id, "w": wake},
        )
        await tx.execute(
            sql("UPDATE runs.wakeup_requests SET run_id = :r WHERE id = :w"),
            {"r": run, "w": wake},
        )
    return str(run)


async def _run_status(db: Database, run_id: str) -> bool:
    async with db.unit_of_work() as tx:
        status = await tx.fetchval(
            sql("SELECT status FROM runs.heartbeat_runs WHERE id = :id"), {"id": run_id}
        )
    return status in TERMINAL
