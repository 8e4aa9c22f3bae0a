"""Test agent: ``flood.py MIB`` writes MIB mebibytes to stdout as fast as it can, exits 0."""

import sys

block = (b"x" * 1023 + b"\n") * 1024  # 1 MiB of 1 KiB lines
for _ in range(int(sys.argv[1])):
    sys.stdout.buffer.write(block)
sys.stdout.buffer.flush()
