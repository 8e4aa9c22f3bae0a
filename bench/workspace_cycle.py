"""The workspace service under load: a runtime service's start-to-ready latency next to
the same program started bare, and jobs writing 10 MiB each, next to the same command
run bare, with the service process's memory sampled throughout.

**Setup.** One company (``issues.companies``) and one execution workspace written with SQL
(``workspaces.execution_workspaces``: ``shared_workspace`` / ``project_primary`` /
``local_fs``, its cwd a fresh directory under the bench's home), whose config has one
service, ``web`` (``exec <python> -m http.server $PORT --bind 127.0.0.1``, ``auto_port``,
url ``http://127.0.0.1:{{port}}/``, readiness every 100 ms, the floor), and one job,
``flood`` (``head -c 10485760 /dev/zero | tr '\\0' x``: 10 MiB on stdout, no newline).
Every call goes to the ``python -m workspace_service`` process the bench started, signed
as a service actor.

**Start-to-ready** (``start_to_ready``). ``service``: the latency of one
``ControlRuntimeServices(RUNTIME_ACTION_START, workspace_command_id="service:web")``,
which returns once the service's URL answered 2xx (the workspace service reserves a
port in the database, spawns ``/bin/sh -c`` the command in a new session, records the
process, then probes). After each sample the service is stopped with
``RUNTIME_ACTION_STOP`` (not timed). ``bare``: from before
``asyncio.create_subprocess_exec("/bin/sh", "-c", same command)`` (``PORT`` = a free
loopback port, new session, output to /dev/null) until ``GET /`` answers 200, probed with
the workspace service's own probe (``readiness.http_status``) at once and then every
100 ms, as the service does; its process group is then killed (not timed). The two are
interleaved sample by sample (which goes first alternates), 2 warm-ups then 15 samples.
Both are quantized by the 100 ms poll: the overhead is the service's own work (gRPC, the
recorded operation, the port reservation and process rows, the desired-state write)
plus whatever poll tick it pushes the ready answer to.

**Jobs** (``jobs``). ``service``: 20
``ControlRuntimeServices(RUNTIME_ACTION_RUN, workspace_command_id="job:flood")``, one at
a time, each a recorded operation with the job as a nested operation that keeps only
the last 256 KiB of each stream (and digests all of it). ``bare``, the ceiling: the
job's command run 20 times with ``asyncio.create_subprocess_exec("/bin/sh", "-c", ...)``
(new session, stdout piped and read in 64 KiB chunks and discarded, stderr to
/dev/null). The two are interleaved job by job (which goes first alternates), so that
both see the same load (client, service and database share the machine); jobs per
second is 20 over the sum of each one's job times. During the series the
workspace service process's RSS (psutil; its pid from the ready file the process
writes) is sampled every 20 ms: reported are the RSS before the series, its peak during
it, after it, and the growth (peak - before), which should stay flat. The nested
operations' rows are then read back: the largest stored ``stdout`` (bytes) is reported
against 256 KiB plus its first line, the truncation marker, with how many succeeded and
recorded all 10,485,760 bytes in ``stdout_bytes``. The bench reports these figures; it
enforces none of them.

``python -m bench.workspace_cycle`` runs this section alone (embedded PostgreSQL, or a
fresh database on PAPERCLIP_BENCH_DATABASE_URL) and prints it. ``python -m bench`` starts
the workspace service with the other services (the gateway routes to it), runs this
section after the run-service section and writes it under the JSON's ``workspaces`` key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil

from bench.bench_database import bench_database
from bench.processes import KEY, pid_of, service_process
from bench.stats import Series
from common.actor import service_actor, sign_actor
from common.database_url import asyncpg_dsn
from paperclip.workspaces.v1 import workspace_messages_pb2 as messages
from paperclip.workspaces.v1 import workspaces_pb2 as pb
from paperclip.workspaces.v1 import workspaces_pb2_grpc
from workspace_service.output_tail import TAIL_BYTES
from workspace_service.readiness import http_status

MODULE = "workspace_service"
READY_WARMUP = 2
READY_SAMPLES = 15
READY_INTERVAL_MS = 100
JOB_RUNS = 20
JOB_BYTES = 10 * 1024 * 1024
READ_BYTES = 64 * 1024
RSS_INTERVAL_S = 0.02
CALL_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 30.0
MIB = 1024 * 1024
SERVICE_ID = "service:web"
JOB_ID = "job:flood"
SERVICE_COMMAND = f"exec {shlex.quote(sys.executable)} -m http.server $PORT --bind 127.0.0.1"
JOB_COMMAND = f"head -c {JOB_BYTES} /dev/zero | tr '\\0' x"

#: What the bench reports against; it does not enforce them.
AIM_RSS_GROWTH_MIB = 20.0


def ready_pid(home: Path) -> int:
    """The pid of the workspace service process ``service_process`` started in ``home``."""
    return pid_of(home, MODULE)


# --- seeding -------------------------------------------------------------------------


def workspace_config() -> dict[str, Any]:
    return {
        "runtime": {
            "services": [
                {
                    "name": "web",
                    "command": SERVICE_COMMAND,
                    "auto_port": True,
                    "url": "http://127.0.0.1:{{port}}/",
                    "readiness": {"interval_ms": READY_INTERVAL_MS},
                }
            ],
            "jobs": [{"name": "flood", "command": JOB_COMMAND}],
        }
    }


async def _seed(conn: asyncpg.Connection, cwd: Path) -> tuple[str, str]:
    """A company and its execution workspace in ``cwd``: (company id, workspace id)."""
    prefix = "W" + uuid.uuid4().hex[:6].upper().translate(str.maketrans("0123456789", "GHIJKLMNOP"))
    async with conn.transaction():
        company = await conn.fetchval(
            "INSERT INTO issues.companies (name, issue_prefix) VALUES ($1, $2) RETURNING id",
            "bench-workspaces",
            prefix,
        )
        workspace = await conn.fetchval(
            """
            INSERT INTO workspaces.execution_workspaces
                (company_id, name, mode, strategy_type, cwd, provider_type, config)
            VALUES ($1, 'bench workspace', 'shared_workspace', 'project_primary', $2,
                    'local_fs', $3::jsonb)
            RETURNING id
            """,
            company,
            str(cwd),
            json.dumps(workspace_config()),
        )
    return str(company), str(workspace)


# --- calls ---------------------------------------------------------------------------


@dataclass
class _Control:
    stub: Any
    key: bytes
    workspace_id: str

    async def call(self, action: int, command_id: str) -> pb.ControlRuntimeServicesResponse:
        reply: pb.ControlRuntimeServicesResponse = await self.stub.ControlRuntimeServices(
            pb.ControlRuntimeServicesRequest(
                workspace_id=self.workspace_id,
                action=action,  # type: ignore[arg-type]
                workspace_command_id=command_id,
            ),
            metadata=sign_actor(service_actor("bench"), self.key),
            timeout=CALL_TIMEOUT_S,
        )
        return reply


def _check(reply: pb.ControlRuntimeServicesResponse, what: str) -> None:
    if reply.operation.status != messages.OPERATION_STATUS_SUCCEEDED:
        status = messages.OperationStatus.Name(reply.operation.status)
        raise RuntimeError(f"the {what}'s operation {reply.operation.id} ended {status}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def _bare_ready(cwd: Path) -> float:
    """ms from the spawn of the service's command until it answers 200."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    began = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        SERVICE_COMMAND,
        cwd=str(cwd),
        env={**os.environ, "PORT": str(port)},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while True:
            with contextlib.suppress(OSError, TimeoutError):
                if await http_status(url) == 200:
                    break
            if proc.returncode is not None:
                raise RuntimeError(f"the bare server exited {proc.returncode}")
            if time.perf_counter() - began > READY_TIMEOUT_S:
                raise TimeoutError(f"the bare server never answered on {url}")
            await asyncio.sleep(READY_INTERVAL_MS / 1000)
        return (time.perf_counter() - began) * 1000
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def _service_ready(control: _Control) -> float:
    """ms of one START call (it returns once the service answered 2xx); then STOP."""
    began = time.perf_counter()
    reply = await control.call(pb.RUNTIME_ACTION_START, SERVICE_ID)
    elapsed = (time.perf_counter() - began) * 1000
    _check(reply, "start")
    await control.call(pb.RUNTIME_ACTION_STOP, SERVICE_ID)
    return elapsed


async def _start_to_ready(control: _Control, cwd: Path) -> dict[str, Series]:
    series = {"service": Series("service"), "bare": Series("bare")}
    for index in range(READY_WARMUP + READY_SAMPLES):
        record = index >= READY_WARMUP
        order = ("bare", "service") if index % 2 == 0 else ("service", "bare")
        for name in order:
            ms = await (_bare_ready(cwd) if name == "bare" else _service_ready(control))
            if record:
                series[name].samples.append(ms)
    return series


async def _bare_job(cwd: Path) -> int:
    """Run the job's command, reading its stdout in 64 KiB chunks; the bytes read."""
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        JOB_COMMAND,
        cwd=str(cwd),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    assert proc.stdout is not None
    total = 0
    while chunk := await proc.stdout.read(READ_BYTES):
        total += len(chunk)
    if await proc.wait() != 0:
        raise RuntimeError(f"the bare job exited {proc.returncode}")
    return total


class _RssSampler:
    """The RSS of one process every ``RSS_INTERVAL_S`` while running."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.samples: list[int] = []
        self._task: asyncio.Task[None] | None = None

    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    async def _loop(self) -> None:
        while True:
            self.samples.append(self.rss())
            await asyncio.sleep(RSS_INTERVAL_S)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.samples.append(self.rss())


async def _jobs(conn: asyncpg.Connection, control: _Control, cwd: Path, pid: int) -> dict[str, Any]:
    bare, service = Series("bare"), Series("service")
    outer: list[str] = []

    async def one_bare() -> None:
        began = time.perf_counter()
        read = await _bare_job(cwd)
        bare.samples.append((time.perf_counter() - began) * 1000)
        if read != JOB_BYTES:
            raise RuntimeError(f"the bare job wrote {read} bytes, not {JOB_BYTES}")

    async def one_service() -> None:
        began = time.perf_counter()
        reply = await control.call(pb.RUNTIME_ACTION_RUN, JOB_ID)
        service.samples.append((time.perf_counter() - began) * 1000)
        _check(reply, "job")
        outer.append(reply.operation.id)

    sampler = _RssSampler(pid)
    before = sampler.rss()
    sampler.start()
    try:
        for index in range(JOB_RUNS):
            first, second = (one_bare, one_service) if index % 2 == 0 else (one_service, one_bare)
            await first()
            await second()
    finally:
        await sampler.stop()
    bare_s, service_s = sum(bare.samples) / 1000, sum(service.samples) / 1000
    after = sampler.samples[-1]
    peak = max(sampler.samples)
    stored = await conn.fetchrow(
        """
        SELECT count(*) AS n,
               count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
               count(*) FILTER (WHERE stdout_bytes = $2) AS complete,
               max(octet_length(stdout)) AS max_stdout,
               max(octet_length(split_part(stdout, E'\\n', 1)) + 1) AS max_marker
        FROM workspaces.workspace_operations
        WHERE parent_operation_id = ANY($1::uuid[])
        """,
        outer,
        JOB_BYTES,
    )
    assert stored is not None
    bound = TAIL_BYTES + int(stored["max_marker"] or 0)
    return {
        "runs": JOB_RUNS,
        "bytes_per_job": JOB_BYTES,
        "service": {
            **service.summary(),
            "seconds": round(service_s, 3),
            "jobs_per_s": round(JOB_RUNS / service_s, 2),
        },
        "bare": {
            **bare.summary(),
            "seconds": round(bare_s, 3),
            "jobs_per_s": round(JOB_RUNS / bare_s, 2),
        },
        "rss": {
            "samples": len(sampler.samples),
            "before_mib": round(before / MIB, 2),
            "peak_mib": round(peak / MIB, 2),
            "after_mib": round(after / MIB, 2),
            "growth_mib": round((peak - before) / MIB, 2),
        },
        "stored_stdout": {
            "nested_operations": int(stored["n"]),
            "succeeded": int(stored["succeeded"]),
            "complete_byte_counts": int(stored["complete"]),
            "max_stdout_bytes": int(stored["max_stdout"] or 0),
            "max_marker_line_bytes": int(stored["max_marker"] or 0),
            "bound_bytes": bound,
            "within_bound": int(stored["max_stdout"] or 0) <= bound,
        },
    }


# --- entry point --------------------------------------------------------------------


async def measure_workspaces(
    database_url: str, address: str, home: Path, key: bytes
) -> dict[str, Any]:
    """Every workspace-service figure (see the module docstring), as the JSON's
    ``workspaces`` key."""
    pid = ready_pid(home)
    cwd = home / "bench-workspace"
    cwd.mkdir(exist_ok=True)
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    channel = grpc.aio.insecure_channel(address)
    try:
        _company, workspace = await _seed(conn, cwd)
        control = _Control(workspaces_pb2_grpc.WorkspaceServiceStub(channel), key, workspace)
        series = await _start_to_ready(control, cwd)
        ready = {name: s.summary() for name, s in series.items()}
        print(_ready_lines(ready), flush=True)
        jobs = await _jobs(conn, control, cwd, pid)
        print(_jobs_line(jobs), flush=True)
    finally:
        await channel.close()
        await conn.close()
    service, bare = ready["service"], ready["bare"]
    figures = {
        "start_p50_minus_bare_p50_ms": round(service["p50_ms"] - bare["p50_ms"], 3),
        "start_p50_over_bare_p50": round(service["p50_ms"] / bare["p50_ms"], 3),
        "start_p90_minus_bare_p90_ms": round(service["p90_ms"] - bare["p90_ms"], 3),
        "jobs_per_s": jobs["service"]["jobs_per_s"],
        "bare_jobs_per_s": jobs["bare"]["jobs_per_s"],
        "jobs_over_bare": round(jobs["service"]["jobs_per_s"] / jobs["bare"]["jobs_per_s"], 3),
        "rss_growth_mib": jobs["rss"]["growth_mib"],
        "max_stored_stdout_bytes": jobs["stored_stdout"]["max_stdout_bytes"],
    }
    return {
        "service_command": SERVICE_COMMAND,
        "job_command": JOB_COMMAND,
        "readiness_interval_ms": READY_INTERVAL_MS,
        "start_to_ready": ready,
        "jobs": jobs,
        "figures": figures,
    }


def _ready_lines(ready: dict[str, dict[str, float]]) -> str:
    lines = [f"  {'start-to-ready':24s} {'n':>4s} {'p50 ms':>8s} {'p90 ms':>8s} {'max ms':>8s}"]
    for name, m in ready.items():
        lines.append(
            f"  {name:24s} {m['n']:>4d} {m['p50_ms']:>8.2f} {m['p90_ms']:>8.2f} {m['max_ms']:>8.2f}"
        )
    return "\n".join(lines)


def _jobs_line(jobs: dict[str, Any]) -> str:
    s, b, r = jobs["service"], jobs["bare"], jobs["rss"]
    return (
        f"  jobs of {jobs['bytes_per_job'] // MIB} MiB: {s['jobs_per_s']:.1f}/s through the "
        f"service, {b['jobs_per_s']:.1f}/s bare ({jobs['runs']} each); service RSS "
        f"{r['before_mib']:.1f} -> peak {r['peak_mib']:.1f} MiB"
    )


def table(workspaces: dict[str, Any]) -> str:
    """The workspace-service figures as printed at the end of the bench."""
    header = f"{'workspace service':36s} {'n':>7s} {'p50 ms':>9s} {'p90 ms':>9s} {'max ms':>9s}"
    rows = [header, "-" * len(header)]
    for name, m in workspaces["start_to_ready"].items():
        rows.append(
            f"{'start_to_ready_' + name:36s} {m['n']:>7d} {m['p50_ms']:>9.2f} "
            f"{m['p90_ms']:>9.2f} {m['max_ms']:>9.2f}"
        )
    jobs = workspaces["jobs"]
    for name in ("service", "bare"):
        m = jobs[name]
        rows.append(
            f"{'job_10mib_' + name:36s} {m['n']:>7d} {m['p50_ms']:>9.2f} "
            f"{m['p90_ms']:>9.2f} {m['max_ms']:>9.2f}"
        )
    s, b, r, o = jobs["service"], jobs["bare"], jobs["rss"], jobs["stored_stdout"]
    rows.append(
        f"jobs/s: {s['jobs_per_s']:.1f} through the service, {b['jobs_per_s']:.1f} bare "
        f"({jobs['runs']} x {jobs['bytes_per_job'] // MIB} MiB, {s['seconds']:.2f} s vs "
        f"{b['seconds']:.2f} s)"
    )
    rows.append(
        f"service RSS: {r['before_mib']:.1f} MiB before, peak {r['peak_mib']:.1f}, after "
        f"{r['after_mib']:.1f} ({r['samples']} samples every {RSS_INTERVAL_S * 1000:.0f} ms)"
    )
    rows.append(
        f"stored stdout: max {o['max_stdout_bytes']} bytes (bound {o['bound_bytes']} = "
        f"{TAIL_BYTES} + marker line {o['max_marker_line_bytes']}); "
        f"{o['succeeded']}/{o['nested_operations']} succeeded, "
        f"{o['complete_byte_counts']} with stdout_bytes = {jobs['bytes_per_job']}"
    )
    return "\n".join(rows)


def aims(workspaces: dict[str, Any]) -> list[str]:
    """One line per figure the workspace section aims at, saying whether this run met it."""

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    f = workspaces["figures"]
    stored = workspaces["jobs"]["stored_stdout"]
    growth = f["rss_growth_mib"]
    return [
        f"aim: start-to-ready overhead vs bare: {f['start_p50_minus_bare_p50_ms']:+.2f} ms at "
        f"p50 (x{f['start_p50_over_bare_p50']:.2f}; p90 "
        f"{f['start_p90_minus_bare_p90_ms']:+.2f} ms; both polled every "
        f"{READY_INTERVAL_MS} ms)",
        f"aim: jobs/s with 10 MiB of output: {f['jobs_per_s']:.1f} vs bare "
        f"{f['bare_jobs_per_s']:.1f} (x{f['jobs_over_bare']:.2f})",
        f"aim: peak RSS growth over {JOB_RUNS} x 10 MiB jobs: {growth:.2f} MiB (flat if < "
        f"{AIM_RSS_GROWTH_MIB:g} MiB), {verdict(growth < AIM_RSS_GROWTH_MIB)}",
        f"aim: stored stdout <= 256 KiB + marker line: max {stored['max_stdout_bytes']} <= "
        f"{stored['bound_bytes']}, {verdict(bool(stored['within_bound']))}",
    ]


def main() -> int:
    """This section alone: its own database (embedded unless PAPERCLIP_BENCH_DATABASE_URL
    names a server) and workspace service process; prints, writes nothing."""
    external = os.environ.get("PAPERCLIP_BENCH_DATABASE_URL")
    with tempfile.TemporaryDirectory(prefix="paperclip-bench-") as tmp, ExitStack() as stack:
        home = Path(tmp)
        database_url = stack.enter_context(bench_database(home, external))
        address = stack.enter_context(
            service_process(
                MODULE, database_url, home, {"PAPERCLIP_WORKSPACE_SERVICE_ADDR": "127.0.0.1:0"}
            )
        )
        print("workspace service: start-to-ready, 10 MiB jobs, memory", flush=True)
        figures = asyncio.run(measure_workspaces(database_url, address, home, KEY))
    print()
    print(table(figures))
    print(json.dumps(figures["figures"], indent=2))
    print("\n".join(aims(figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
