"""Test agent: prints to stderr and exits 3."""

import sys

print("failing on purpose", file=sys.stderr)
sys.exit(3)
