"""A call to another service repeated until that service acknowledges it.

For the run service's after-run calls (``ReleaseRunLocks``, ``ReleaseRunLeases``): each
is an idempotent compare-and-set, so repeating it is always safe. Transient failures
(the peer is down, slow, or lost a race) are retried with jittered exponential backoff;
a refusal for good is logged and given up, as is everything once shutdown begins. The
peer's own sweep converges whatever is given up.

The call goes over a channel of ``common.channels``, so a failure arrives as the
``common.errors`` exception of its status; its status code decides whether to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from common.errors import PaperclipError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Backoff between attempts: 0.1 s doubling up to 5 s, each drawn between half and all.
BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 5.0
#: Errors worth retrying: the peer is down, slow or lost a race.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)


async def until_acknowledged(
    call: Callable[[], Awaitable[T]], *, name: str, run_id: str, closing: asyncio.Event
) -> T | None:
    """``await call()`` until it answers; None when refused for good or on shutdown
    (``closing`` set: one more attempt at most). ``call`` fails with a ``PaperclipError``
    whose ``code`` is the status code of the failed call."""
    delay = BACKOFF_INITIAL
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except PaperclipError as error:
            if error.code not in RETRYABLE:
                logger.error(
                    f"{name} refused",
                    extra={"run_id": run_id, "reason": error.reason, "error": str(error)},
                )
                return None
            logger.warning(
                f"{name} failed, retrying",
                extra={
                    "run_id": run_id,
                    "code": error.code.name,
                    # The peer's reason (DATABASE_UNAVAILABLE folds into an outage's log).
                    "reason": error.reason,
                    "attempt": attempt,
                },
            )
        if closing.is_set():
            logger.warning(f"giving up {name} on shutdown", extra={"run_id": run_id})
            return None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), timeout=delay * (0.5 + random.random() / 2))
        delay = min(delay * 2, BACKOFF_MAX)
