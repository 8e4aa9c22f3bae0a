"""The ``python -m <service>`` entrypoint shared by every service process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from prometheus_client import start_http_server

from common.config import Settings, load_settings
from common.db import Database
from common.embedded_pg import normalize_database_url
from common.log import configure_logging
from common.server import ServiceSpec, serve_until_signalled, start_server

SpecsFactory = Callable[[Database, Settings], Sequence[ServiceSpec]]
BackgroundFactory = Callable[[Database, Settings], Sequence[Coroutine[Any, Any, None]]]


async def _main(
    service: str,
    address: str,
    settings: Settings,
    factory: SpecsFactory,
    background: BackgroundFactory | None,
) -> None:
    if settings.database_url is None:
        raise SystemExit(f"{service}: PAPERCLIP_DATABASE_URL is required (make run sets it)")
    db = Database(
        normalize_database_url(settings.database_url),
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        name=service,
    )
    if settings.metrics_addr:
        host, _, port = settings.metrics_addr.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0")
    running = await start_server(factory(db, settings), address, settings.internal_key)
    # Background work starts after the server listens: recovery never delays start-up.
    for job in background(db, settings) if background else ():
        running.background.append(asyncio.create_task(job))
    await serve_until_signalled(
        running,
        service=service,
        address=address,
        ready_file=settings.ready_file,
        on_stop=db.dispose,
    )


def run(
    service: str,
    address_of: Callable[[Settings], str],
    factory: SpecsFactory,
    background: BackgroundFactory | None = None,
) -> None:
    """Configure logging, then serve ``factory``'s services (and run ``background``
    jobs) until signalled."""
    settings = load_settings()
    configure_logging(service, settings.log_level)
    asyncio.run(_main(service, address_of(settings), settings, factory, background))
