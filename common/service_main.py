"""The ``python -m <service>`` entrypoint shared by every service process."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import start_http_server

from common.config import Settings, load_settings
from common.database_url import normalize_database_url
from common.db import Database
from common.log import configure_logging
from common.outage import watch_database
from common.server import ServiceSpec, host_of, serve_until_signalled, start_server
from common.tracing import setup_tracing
from supervision.process_group import die_with_parent

Job = Coroutine[Any, Any, None]


@dataclass
class Wiring:
    """What a service process serves, what it runs in the background once it listens,
    and what it must do on the way out (after the server stopped, before the pool
    closes)."""

    specs: Sequence[ServiceSpec]
    jobs: Sequence[Job] = ()
    on_stop: Sequence[Callable[[], Awaitable[None]]] = field(default_factory=list)
    #: Background work that needs the address other processes reach this one at.
    on_listen: Sequence[Callable[[str], Job]] = ()


WiringFactory = Callable[[Database, Settings], Wiring]


async def _main(
    service: str,
    address: str,
    settings: Settings,
    factory: WiringFactory,
) -> None:
    if settings.database_url is None:
        raise SystemExit(f"{service}: PAPERCLIP_DATABASE_URL is required (make run sets it)")
    db = Database(
        normalize_database_url(settings.database_url),
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        name=service,
    )
    start_metrics(settings)
    wiring = factory(db, settings)
    running = await start_server(wiring.specs, address, settings.internal_key)
    running.background.append(
        asyncio.create_task(watch_database(db, running.health, running.services))
    )
    # Background work starts after the server listens: recovery never delays start-up.
    for job in wiring.jobs:
        running.background.append(asyncio.create_task(job))
    advertised = advertised_address(settings, address, running.port)
    for start in wiring.on_listen:
        running.background.append(asyncio.create_task(start(advertised)))

    async def stop() -> None:
        for hook in wiring.on_stop:
            await hook()
        await db.dispose()

    await serve_until_signalled(
        running, service=service, address=address, ready_file=settings.ready_file, on_stop=stop
    )


def start_metrics(settings: Settings) -> None:
    """Serve Prometheus metrics at ``PAPERCLIP_METRICS_ADDR`` when it is set."""
    if settings.metrics_addr:
        host, _, port = settings.metrics_addr.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0")


def advertised_address(settings: Settings, address: str, port: int) -> str:
    """``host:port`` at which other processes reach this one: ``PAPERCLIP_ADVERTISE_ADDR``,
    else the listen address with its bound port (a wildcard host becomes this machine's
    address)."""
    if settings.advertise_addr:
        return settings.advertise_addr
    host = host_of(address).strip("[]")
    if host in ("", "0.0.0.0", "::"):
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
    return f"{host}:{port}"


def run(service: str, address_of: Callable[[Settings], str], factory: WiringFactory) -> None:
    """Configure logging, then serve what ``factory`` wires until signalled."""
    die_with_parent()
    settings = load_settings()
    configure_logging(service, settings.log_level)
    setup_tracing(settings, service)
    asyncio.run(_main(service, address_of(settings), settings, factory))
