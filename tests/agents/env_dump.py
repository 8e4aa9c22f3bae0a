"""Test agent: prints its environment as one JSON object.

``env_dump.py`` prints all of it; ``env_dump.py NAME...`` prints the ``PAPERCLIP_*``
variables and the named ones.
"""

import json
import os
import sys

names = set(sys.argv[1:])
print(
    json.dumps(
        {
            key: value
            for key, value in sorted(os.environ.items())
            if not names or key.startswith("PAPERCLIP_") or key in names
        }
    ),
    flush=True,
)
