"""A child's output: both pipes read concurrently, delivered in order, capped per run.

Chunks go to the caller's async callback as raw bytes (decoding is the caller's choice).
Each stream is read by its own task that awaits the callback before reading on, so a
stream's chunks arrive in order and a slow consumer back-pressures the child through the
pipe. Once the run's cap of stored bytes is reached, later chunks are counted but
dropped, so a flooding child is drained at full speed with bounded memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

logger = logging.getLogger(__name__)

Stream = Literal["stdout", "stderr"]
#: ``on_output(stream, data, truncated)``. ``truncated`` is True exactly once per run:
#: on the last chunk stored (cut to fit the cap, possibly empty); what follows is dropped.
OutputCallback = Callable[[Stream, bytes, bool], Awaitable[None]]


class OutputSink:
    """Counts every byte of both streams and delivers the first ``max_bytes`` of them."""

    def __init__(
        self,
        on_output: OutputCallback | None,
        *,
        max_bytes: int,
        on_activity: Callable[[], None],
    ) -> None:
        self._on_output = on_output
        self._max_bytes = max_bytes
        self._on_activity = on_activity
        # One delivery at a time, so the caller may number chunks across both streams.
        self._lock = asyncio.Lock()
        self.counts: dict[Stream, int] = {"stdout": 0, "stderr": 0}
        self.stored = 0
        self.truncated = False

    async def feed(self, stream: Stream, data: bytes) -> None:
        """Account for ``data`` read from ``stream`` and deliver what fits under the cap."""
        self.counts[stream] += len(data)
        self._on_activity()  # any output, kept or not, shows the agent is alive
        if self.truncated:
            return
        room = self._max_bytes - self.stored
        cut = len(data) > room
        if cut:
            data = data[:room]
            self.truncated = True
        self.stored += len(data)
        if self._on_output is not None and (data or cut):
            async with self._lock:
                await self._deliver(stream, data, cut)

    async def _deliver(self, stream: Stream, data: bytes, truncated: bool) -> None:
        assert self._on_output is not None
        try:
            await self._on_output(stream, data, truncated)
        except Exception:
            # A failing consumer must not stall the pipe (the child would block on write)
            # nor end the supervision: the chunk is lost, the run goes on.
            logger.exception("output callback failed", extra={"stream": stream})


async def pump(
    reader: asyncio.StreamReader, stream: Stream, sink: OutputSink, *, chunk_bytes: int
) -> None:
    """Read ``reader`` to EOF in chunks of at most ``chunk_bytes`` into ``sink``.

    A longer write by the child arrives as several chunks; nothing is cut here.
    """
    while chunk := await reader.read(chunk_bytes):
        await sink.feed(stream, chunk)
