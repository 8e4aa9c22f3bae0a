"""A service process started as ``make run`` starts it, with ``PAPERCLIP_OTLP_ENDPOINT``
naming a collector this test serves: the spans of a call arrive there over OTLP,
continuing the caller's trace, under the service's name."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from common.actor import sign_actor
from paperclip.issues.v1 import issues_pb2, issues_pb2_grpc
from tests.e2e.service_processes import ServiceProcesses
from tests.harness import INTERNAL_KEY, admin, unique_prefix
from tests.waiting import wait_until


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, trace_pb2.Span]] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((service, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
async def collector() -> AsyncIterator[tuple[_Collector, int]]:
    found = _Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(found, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield found, port
    await server.stop(0)


@pytest.fixture
def issue_process(
    database_url: str, tmp_path: Path, collector: tuple[_Collector, int]
) -> Iterator[str]:
    processes = ServiceProcesses(
        database_url,
        tmp_path,
        jwt_secret="export-test-jwt-secret-0123456789abcdef",
        PAPERCLIP_OTLP_ENDPOINT=f"http://127.0.0.1:{collector[1]}",
        # The SDK's batch processor exports every 5 s by default.
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    try:
        processes.start("issue_service", "PAPERCLIP_ISSUE_SERVICE_ADDR")
        yield processes.env["PAPERCLIP_ISSUE_SERVICE_ADDR"]
    finally:
        processes.stop()


async def test_service_process_exports_its_spans_to_the_endpoint(
    collector: tuple[_Collector, int], issue_process: str
) -> None:
    found, _ = collector
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    metadata = (
        *sign_actor(admin(), INTERNAL_KEY),
        ("traceparent", f"00-{trace_id}-{parent_id}-01"),
    )
    async with grpc.aio.insecure_channel(issue_process) as channel:
        stub = issues_pb2_grpc.IssueServiceStub(channel)
        await stub.CreateCompany(
            issues_pb2.CreateCompanyRequest(name="Exported", issue_prefix=unique_prefix()),
            metadata=metadata,
        )

    def in_trace() -> list[tuple[str, trace_pb2.Span]]:
        return [(s, span) for s, span in found.spans if span.trace_id.hex() == trace_id]

    def exported() -> bool:
        return any(span.kind == trace_pb2.Span.SPAN_KIND_CLIENT for _, span in in_trace())

    await wait_until(exported, within=20, what="the service's spans at the collector")
    await asyncio.sleep(0.3)  # a statement span may come in the next batch
    spans = in_trace()
    assert {service for service, _ in spans} == {"issue_service"}
    [server] = [span for _, span in spans if span.kind == trace_pb2.Span.SPAN_KIND_SERVER]
    assert server.name == "paperclip.issues.v1.IssueService/CreateCompany"
    assert server.parent_span_id.hex() == parent_id
    statements = [span for _, span in spans if span.parent_span_id == server.span_id]
    assert statements
    assert all(
        any(a.key == "db.system" and a.value.string_value == "postgresql" for a in s.attributes)
        for s in statements
    )
