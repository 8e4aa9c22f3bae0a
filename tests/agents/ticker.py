"""Test agent: ``ticker.py GO_FILE COUNT INTERVAL`` waits (silently, up to 60 s) until
GO_FILE exists, then prints ``tick N`` COUNT times, one line every INTERVAL seconds,
and exits 0. The file lets a test start watching before the first line is written."""

import sys
import time
from pathlib import Path

go, count, interval = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + 60
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit("no go file")
    time.sleep(0.05)
for tick in range(count):
    if tick:
        time.sleep(interval)
    print(f"tick {tick}", flush=True)
