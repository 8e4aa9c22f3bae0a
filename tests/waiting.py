"""Waiting for a condition in tests: poll until it holds or a generous deadline passes.

Deadlines only bound a hung test; no test asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

Check = Callable[[], bool] | Callable[[], Awaitable[bool]]


async def wait_until(check: Check, *, within: float = 15.0, what: str = "condition") -> None:
    """Return once ``check()`` (plain or async) is true; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
