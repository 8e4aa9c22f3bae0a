"""Test agent: ``record_start.py PATH SECONDS`` appends ``start <run id>`` to PATH (one
write, O_APPEND: lines of concurrent agents never interleave), sleeps, exits 0."""

import os
import sys
import time

path, seconds = sys.argv[1], float(sys.argv[2])
line = f"start {os.environ['PAPERCLIP_RUN_ID']}\n".encode()
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
try:
    os.write(fd, line)
finally:
    os.close(fd)
time.sleep(seconds)
print("done", flush=True)
