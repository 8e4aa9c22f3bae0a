"""Reading a List RPC page by page, up to the number of items a command shows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

ItemT = TypeVar("ItemT")

#: The most one page may hold (API.md: larger page sizes are coerced to this).
MAX_PAGE_SIZE = 500


async def collect(
    fetch: Callable[[int, str], Awaitable[tuple[Sequence[ItemT], str]]], limit: int
) -> list[ItemT]:
    """Items from ``fetch(page_size, page_token) -> (items, next_page_token)`` until
    ``limit`` are read (0: every page)."""
    items: list[ItemT] = []
    token = ""
    while True:
        want = MAX_PAGE_SIZE if limit <= 0 else min(MAX_PAGE_SIZE, limit - len(items))
        page, token = await fetch(want, token)
        items.extend(page)
        if not token or (limit > 0 and len(items) >= limit):
            return items if limit <= 0 else items[:limit]


__all__ = ["MAX_PAGE_SIZE", "collect"]
