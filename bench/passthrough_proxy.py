"""``python -m bench.passthrough_proxy``: the least a Python gRPC proxy hop can cost.

A ``grpc.aio`` server that forwards every unary call, as opaque bytes, to
``PAPERCLIP_PROXY_TARGET`` with the caller's ``x-paperclip-*`` and ``x-request-id``
metadata, and relays the answer or the status. No authentication, no metrics, no
logging: the floor the gateway's own hop is measured against. Listens on
``PAPERCLIP_PROXY_ADDR`` and announces itself in ``PAPERCLIP_READY_FILE`` as the
services do.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from common.server import write_ready_file

_PASSED_ON = ("x-paperclip-", "x-request-id")


def _passthrough(value: bytes) -> bytes:
    return value


class _Forward(grpc.GenericRpcHandler):
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            call = self._channel.unary_unary(
                method, request_serializer=_passthrough, response_deserializer=_passthrough
            )

            async def forward(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                metadata = tuple(
                    (key, value)
                    for key, value in context.invocation_metadata() or ()
                    if key.startswith(_PASSED_ON)
                )
                try:
                    return await call(request, metadata=metadata, timeout=30)
                except grpc.aio.AioRpcError as err:
                    await context.abort(err.code(), err.details() or "")

            handler = self._handlers[method] = grpc.unary_unary_rpc_method_handler(forward)
        return handler


async def _serve() -> None:
    target = os.environ["PAPERCLIP_PROXY_TARGET"]
    channel = grpc.aio.insecure_channel(target)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_Forward(channel),))
    address = os.environ.get("PAPERCLIP_PROXY_ADDR", "127.0.0.1:0")
    port = server.add_insecure_port(address)
    await server.start()
    ready = os.environ.get("PAPERCLIP_READY_FILE")
    if ready:
        write_ready_file(Path(ready), "bench.passthrough_proxy", f"127.0.0.1:{port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)
    await channel.close()


if __name__ == "__main__":
    asyncio.run(_serve())
