"""``python -m gateway``: the public address of the suite."""

from __future__ import annotations

import asyncio

from common.config import Settings, load_settings
from common.database_url import normalize_database_url
from common.db import Database
from common.log import configure_logging
from common.server import serve_until_signalled
from common.service_main import start_metrics
from common.tracing import setup_tracing
from gateway.app import backend_addresses, start_gateway
from supervision.process_group import die_with_parent


async def _main(settings: Settings) -> None:
    if settings.database_url is None:
        raise SystemExit("gateway: PAPERCLIP_DATABASE_URL is required (make run sets it)")
    start_metrics(settings)
    db = Database(
        normalize_database_url(settings.database_url),
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        name="gateway",
    )
    gateway = await start_gateway(
        db, settings, address=settings.gateway_addr, backends=backend_addresses(settings)
    )

    async def close() -> None:
        await asyncio.gather(*(c.close() for c in gateway.channels.values()))
        await db.dispose()

    await serve_until_signalled(
        gateway.running,
        service="gateway",
        address=settings.gateway_addr,
        ready_file=settings.ready_file,
        on_stop=close,
    )


if __name__ == "__main__":
    die_with_parent()
    settings = load_settings()
    configure_logging("gateway", settings.log_level)
    setup_tracing(settings, "gateway")
    asyncio.run(_main(settings))
