"""Test agent: prints one line and exits 0."""

import sys

print("hello from succeed")
sys.exit(0)
