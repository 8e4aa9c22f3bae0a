"""Closed-loop load: N concurrent clients repeating one operation for a fixed time."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field

Operation = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class Result:
    """What one workload achieved."""

    name: str
    clients: int
    ops: int
    seconds: float
    ops_per_s: float
    p50_ms: float
    p99_ms: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _percentile(sorted_ms: Sequence[float], fraction: float) -> float:
    if not sorted_ms:
        return 0.0
    index = min(len(sorted_ms) - 1, round(fraction * (len(sorted_ms) - 1)))
    return sorted_ms[index]


async def run_load(
    name: str, operation: Operation, *, clients: int, seconds: float, warmup: float = 1.0
) -> Result:
    """Run ``operation(client_index)`` in ``clients`` loops; latency of each call."""
    latencies: list[float] = []

    async def loop(index: int, until: float, record: bool) -> None:
        while time.perf_counter() < until:
            start = time.perf_counter()
            await operation(index)
            end = time.perf_counter()
            if record and end <= until:
                latencies.append((end - start) * 1000)

    warm_until = time.perf_counter() + warmup
    await asyncio.gather(*(loop(i, warm_until, False) for i in range(clients)))
    began = time.perf_counter()
    await asyncio.gather(*(loop(i, began + seconds, True) for i in range(clients)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    return Result(
        name=name,
        clients=clients,
        ops=len(latencies),
        seconds=round(elapsed, 3),
        ops_per_s=round(len(latencies) / elapsed, 1),
        p50_ms=round(statistics.median(latencies), 3) if latencies else 0.0,
        p99_ms=round(_percentile(latencies, 0.99), 3),
    )


SUMMARY_KEYS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms")


@dataclass
class Series:
    """Latency samples of one measure, in ms."""

    name: str
    samples: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Count, p50, p90, p99, mean, min and max (ms, 3 decimals)."""
        s = sorted(self.samples)
        if not s:
            return {
                "n": 0,
                **dict.fromkeys(("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms"), 0.0),
            }
        return {
            "n": len(s),
            "p50_ms": round(statistics.median(s), 3),
            "p90_ms": round(_percentile(s, 0.90), 3),
            "p99_ms": round(_percentile(s, 0.99), 3),
            "mean_ms": round(statistics.fmean(s), 3),
            "min_ms": round(s[0], 3),
            "max_ms": round(s[-1], 3),
        }
