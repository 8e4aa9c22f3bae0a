"""The ``paperclip`` command's start-up: ``paperclip issues list`` against the bench's
gateway, from process start to exit (the whole answer printed), next to the same
interpreter starting and doing nothing (``python -c pass``), measured in one run."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.db import Database
from gateway.keys import create_key

RUNS = 15
#: What issue 10 aims at; the bench reports whether a run met it, it does not enforce it.
AIM_ISSUES_LIST_MS = 300.0
PAPERCLIP = str(Path(sys.executable).with_name("paperclip"))


async def _board_token(database_url: str) -> str:
    """A board key of an instance admin."""
    db = Database(database_url, pool_size=1, max_overflow=0, name="bench-cli")
    try:
        async with db.unit_of_work() as tx:
            _, token = await create_key(
                tx, user_id="bench-cli", name="bench", is_instance_admin=True, memberships={}
            )
    finally:
        await db.dispose()
    return token


def _timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, check=False, timeout=60)
    elapsed = (time.perf_counter() - started) * 1000
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed: {done.stderr.decode(errors='replace')[-500:]}")
    return elapsed


def measure_cli(database_url: str, gateway: str, env: dict[str, str]) -> dict[str, Any]:
    """Median and min of ``RUNS`` starts of each command (ms)."""
    token = asyncio.run(_board_token(database_url))
    base = {**env, "PAPERCLIP_GATEWAY_ADDR": gateway, "PAPERCLIP_TOKEN": token}
    company = subprocess.run(
        [PAPERCLIP, "--json", "companies", "create", "Bench CLI"],
        env=base,
        capture_output=True,
        check=True,
        timeout=60,
    )
    prefix = str(json.loads(company.stdout)["issue_prefix"])
    commands = {
        "python_c_pass": [sys.executable, "-c", "pass"],
        "paperclip_help": [PAPERCLIP, "--help"],
        "paperclip_issues_list": [PAPERCLIP, "issues", "list", "-c", prefix],
        "paperclip_issues_list_json": [PAPERCLIP, "--json", "issues", "list", "-c", prefix],
    }
    figures: dict[str, Any] = {}
    for name, argv in commands.items():
        samples = [_timed(argv, base) for _ in range(RUNS)]
        figures[f"{name}_median_ms"] = round(statistics.median(samples), 1)
        figures[f"{name}_min_ms"] = round(min(samples), 1)
    figures["issues_list_over_bare_python"] = round(
        figures["paperclip_issues_list_median_ms"] / figures["python_c_pass_median_ms"], 2
    )
    return figures


def aims(figures: dict[str, Any]) -> list[str]:
    median = figures["paperclip_issues_list_median_ms"]
    met = "met" if median < AIM_ISSUES_LIST_MS else "NOT met"
    return [
        f"aim: `paperclip issues list` under {AIM_ISSUES_LIST_MS:g} ms: median {median:.0f} ms "
        f"(min {figures['paperclip_issues_list_min_ms']:.0f} ms), {met}; the interpreter alone "
        f"starts in {figures['python_c_pass_median_ms']:.0f} ms"
    ]
