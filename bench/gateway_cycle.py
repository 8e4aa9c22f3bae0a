"""The same calls through the gateway: what the public path costs over the direct one.

- ``checkout_release_via_gateway``: the checkout/release cycle of ``issue_cycle``, each
  seat's agent calling the gateway with its run token (``authorization: Bearer``), as an
  agent process does. The gateway verifies the token (its cache holds a verified token
  for a few seconds, then the run's row is read again), signs the actor and forwards
  the call to the same issue service process the direct figure measures.
- The gateway's own overhead at one client, two ways: a bare round trip (a health check,
  answered by whichever server is called, so the gateway's own gRPC stack) and a cheap
  authenticated call (``IssueService/GetCompany``) proxied to the issue service, each
  next to the same call made directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from bench.issue_cycle import Metadata, Seat, checkout_release
from bench.stats import Operation, Result
from common.actor import Actor, ActorType, sign_actor
from common.run_tokens import mint_run_token
from paperclip.issues.v1 import issues_pb2, issues_pb2_grpc

#: What issue 3 aims at; the bench reports whether a run met it, it does not enforce it.
AIM_OVERHEAD_P50_MS = 1.0
AIM_CYCLE_OVER_RAW_C16 = 0.30


def run_token_headers(seat: Seat, jwt_secret: bytes) -> Metadata:
    """The bearer header an agent in ``seat``'s run sends (the seat's run is live)."""
    token = mint_run_token(
        jwt_secret, agent_id=seat.agent_id, company_id=seat.company_id, run_id=seat.run_id
    )
    return (("authorization", f"Bearer {token}"),)


def gateway_cycle(channel: grpc.aio.Channel, seats: Sequence[Seat], jwt_secret: bytes) -> Operation:
    """CheckoutIssue then ReleaseIssue through the gateway, each seat with its run token."""
    headers = [run_token_headers(seat, jwt_secret) for seat in seats]
    return checkout_release(channel, seats, lambda index: headers[index])


def get_company_direct(channel: grpc.aio.Channel, seat: Seat, key: bytes) -> Operation:
    """GetCompany straight to the issue service as the seat's agent, signed per call
    (as the gateway signs each call it forwards)."""
    stub = issues_pb2_grpc.IssueServiceStub(channel)
    actor = Actor(
        type=ActorType.AGENT, agent_id=seat.agent_id, company_id=seat.company_id, run_id=seat.run_id
    )
    request = issues_pb2.GetCompanyRequest(company_id=seat.company_id)

    async def call(index: int) -> None:
        await stub.GetCompany(request, metadata=sign_actor(actor, key))

    return call


def get_company_via_gateway(channel: grpc.aio.Channel, seat: Seat, jwt_secret: bytes) -> Operation:
    """GetCompany through the gateway with the seat's run token."""
    stub = issues_pb2_grpc.IssueServiceStub(channel)
    headers = run_token_headers(seat, jwt_secret)
    request = issues_pb2.GetCompanyRequest(company_id=seat.company_id)

    async def call(index: int) -> None:
        await stub.GetCompany(request, metadata=headers)

    return call


def gateway_ratios(results: Sequence[Result]) -> dict[str, float]:
    """The gateway figures: cycle over the raw ceilings and the direct service, and the
    p50 overhead (gateway minus direct) at one client."""
    by = {(r.name, r.clients): r for r in results}
    out: dict[str, float] = {}
    for clients in sorted({c for name, c in by if name == "checkout_release_via_gateway"}):
        gateway = by[("checkout_release_via_gateway", clients)]
        for ceiling in ("raw_same_sql", "raw_minimal_sql"):
            out[f"gateway_cycle_over_{ceiling}_c{clients}"] = round(
                gateway.ops_per_s / by[(f"checkout_release_{ceiling}", clients)].ops_per_s, 3
            )
        direct = by[("checkout_release_via_service", clients)]
        out[f"gateway_cycle_over_service_cycle_c{clients}"] = round(
            gateway.ops_per_s / direct.ops_per_s, 3
        )
        out[f"gateway_cycle_p50_minus_service_cycle_p50_ms_c{clients}"] = round(
            gateway.p50_ms - direct.p50_ms, 3
        )
    proxied, direct_call = by[("get_company_via_gateway", 1)], by[("get_company_direct", 1)]
    out["gateway_overhead_p50_ms_c1"] = round(proxied.p50_ms - direct_call.p50_ms, 3)
    bare_gateway = by[("bare_grpc_round_trip_via_gateway", 1)]
    bare = by[("bare_grpc_round_trip", 1)]
    out["gateway_bare_round_trip_overhead_p50_ms_c1"] = round(bare_gateway.p50_ms - bare.p50_ms, 3)
    return out


def aims(ratios: dict[str, float]) -> list[str]:
    """One line per aim of issue 3, saying whether this run met it."""

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    overhead = ratios["gateway_overhead_p50_ms_c1"]
    met = verdict(overhead < AIM_OVERHEAD_P50_MS)
    lines = [
        f"aim: gateway adds < {AIM_OVERHEAD_P50_MS:g} ms at p50, 1 client "
        f"(proxied GetCompany minus direct): {overhead:.3f} ms, {met}"
    ]
    for ceiling in ("raw_same_sql", "raw_minimal_sql"):
        ratio = ratios[f"gateway_cycle_over_{ceiling}_c16"]
        lines.append(
            f"aim: cycle via gateway >= {AIM_CYCLE_OVER_RAW_C16:.0%} of the {ceiling} ceiling "
            f"at 16 clients: {ratio:.1%}, {verdict(ratio >= AIM_CYCLE_OVER_RAW_C16)}"
        )
    return lines
