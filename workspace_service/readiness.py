"""Readiness of a runtime service: HTTP GET until a 2xx.

The probe speaks just enough HTTP/1.1 over asyncio streams (``http://`` only) to read a
status line, so no HTTP client dependency is needed and a probe never blocks the loop.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from supervision.process_tree import process_alive
from workspace_service.model import RuntimeServiceRecord
from workspace_service.ports import held_outside_tree
from workspace_service.service_process import describe_exit

#: One probe may take this long (connect, send, read the status line); a server that
#: accepts but never answers costs one probe, not the whole readiness window.
PROBE_TIMEOUT_S = 2.0
#: A service without a readiness URL is ready when it is still alive this long after
#: it was spawned: a command that fails at once (typo, missing program) fails its start.
SETTLE_S = 0.5


class NotReadyError(Exception):
    """The service did not become ready; the message says why."""


async def http_status(url: str, *, within: float = PROBE_TIMEOUT_S) -> int:
    """The status code of ``GET url``. ValueError for a URL that is not ``http://``;
    OSError or TimeoutError when nothing answers."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"unsupported readiness URL {url!r} (only http:// is probed)")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = parts.netloc.rpartition("@")[2]
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: paperclip-readiness\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    )
    async with asyncio.timeout(within):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        try:
            writer.write(request.encode("ascii", errors="replace"))
            await writer.drain()
            status_line = await reader.readline()
        finally:
            writer.close()
    fields = status_line.split()
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        raise ConnectionError(f"not an HTTP answer: {status_line[:80]!r}")
    return int(fields[1])


async def is_healthy(url: str) -> bool:
    """Whether ``url`` answers a 2xx now."""
    try:
        return 200 <= await http_status(url) < 300
    except (OSError, TimeoutError, ValueError):
        return False


async def wait_until_ready(
    url: str | None, *, within: float, interval: float, exited: asyncio.Future[int]
) -> None:
    """Return once the service is ready; NotReadyError otherwise.

    With ``url``: a GET every ``interval`` seconds until one answers 2xx, within
    ``within`` seconds. Without: ready if the process is alive ``SETTLE_S`` after it
    was spawned. Either way the process exiting (``exited`` resolves with its return
    code) fails the wait at once.
    """
    if not url:
        done, _ = await asyncio.wait({exited}, timeout=SETTLE_S)
        if done:
            raise NotReadyError(f"the process {describe_exit(exited.result())} right away")
        return
    last = ["no answer yet"]
    probing = asyncio.create_task(_probe_until_ok(url, interval, last))
    racing: set[asyncio.Future[Any]] = {probing, exited}
    try:
        finished, _ = await asyncio.wait(
            racing, timeout=within, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        if not probing.done():
            probing.cancel()
            await asyncio.gather(probing, return_exceptions=True)
    if probing in finished:
        probing.result()  # NotReadyError for a URL that cannot be probed
        return
    if exited in finished:
        raise NotReadyError(f"the process {describe_exit(exited.result())} before {url} answered")
    raise NotReadyError(f"{url} did not answer 2xx within {within:g} s (last: {last[0]})")


async def _probe_until_ok(url: str, interval: float, last: list[str]) -> None:
    while True:
        try:
            status = await http_status(url)
        except ValueError as exc:
            raise NotReadyError(str(exc)) from exc
        except TimeoutError:
            last[0] = f"no answer within {PROBE_TIMEOUT_S:g} s"
        except OSError as exc:
            last[0] = exc.strerror or str(exc) or type(exc).__name__
        else:
            if 200 <= status < 300:
                return
            last[0] = f"HTTP {status}"
        await asyncio.sleep(interval)


async def adoption_refusal(row: RuntimeServiceRecord, url: str | None) -> str | None:
    """Why the recorded process of ``row`` cannot be adopted after a restart, or None:
    it must be alive (pid + create time), answer 2xx on ``url`` (if any), and no process
    outside its tree may hold its port."""
    if row.pid is None or row.create_time is None:
        return "no process was recorded"
    if not process_alive(row.pid, row.create_time):
        return f"process {row.pid} is gone"
    if url and not await is_healthy(url):
        return f"{url} does not answer 2xx"
    if row.port is not None:
        stranger = held_outside_tree(row.port, row.pid, row.pgid or row.pid, row.create_time)
        if stranger is not None:
            return f"port {row.port} is held by pid {stranger}, outside its process tree"
    return None
