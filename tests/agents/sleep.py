"""Test agent: ``sleep.py SECONDS [INTERVAL]`` sleeps, printing a numbered progress line
every INTERVAL seconds (default 1; 0 = silent), then exits 0."""

import sys
import time

seconds = float(sys.argv[1])
interval = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
deadline = time.monotonic() + seconds
tick = 0
while (left := deadline - time.monotonic()) > 0:
    if interval > 0:
        print(f"progress {tick}", flush=True)
        tick += 1
        time.sleep(min(interval, left))
    else:
        time.sleep(left)
print("done", flush=True)
