"""The bench's server processes: each service (and the gateway) as ``python -m <module>``,
as ``make run`` starts them, with the bench's keys."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

KEY = uuid.uuid4().hex.encode()
JWT_SECRET = uuid.uuid4().hex.encode()
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


@contextmanager
def service_process(
    module: str, database_url: str, home: Path, extra: Mapping[str, str]
) -> Iterator[str]:
    """``python -m <module>`` as one of the bench's server processes; yields its address
    and stops it (SIGTERM, then SIGKILL) on the way out, whatever happened."""
    ready = home / f"{module}.ready"
    ready.unlink(missing_ok=True)
    # One metrics port is for one process; the bench's processes would clash.
    inherited = {k: v for k, v in os.environ.items() if k != "PAPERCLIP_METRICS_ADDR"}
    env = {
        **inherited,
        "PAPERCLIP_HOME": str(home),
        "PAPERCLIP_DATABASE_URL": database_url,
        "PAPERCLIP_INTERNAL_KEY": KEY.decode(),
        "PAPERCLIP_JWT_SECRET": JWT_SECRET.decode(),
        "PAPERCLIP_READY_FILE": str(ready),
        "PAPERCLIP_LOG_LEVEL": "WARNING",
        "PAPERCLIP_DB_POOL_SIZE": "20",
        **extra,
    }
    proc = subprocess.Popen([sys.executable, "-m", module], env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{module} did not start")
            time.sleep(0.05)
        yield str(json.loads(ready.read_text())["addr"])
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def wait_serving(address: str) -> None:
    """The gateway reports SERVING once it has seen its backends serve."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway never reported SERVING")
            await asyncio.sleep(0.1)


def pid_of(home: Path, module: str) -> int:
    """The pid of the ``module`` process :func:`service_process` started in ``home``: the
    process writes it into its own ready file."""
    pid = int(json.loads((home / f"{module}.ready").read_text())["pid"])
    if module not in " ".join(psutil.Process(pid).cmdline()):
        raise RuntimeError(f"pid {pid} of the ready file is not {module}")
    return pid
