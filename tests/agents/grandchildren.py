"""Test agent: spawns two grandchildren that sleep forever, one in its own process group
and one in a new session (out of reach of a group signal), and prints their pids as JSON
(``{"same_group": pid, "new_session": pid}``). Both inherit stdout and stderr.

``grandchildren.py`` then sleeps forever; ``grandchildren.py exit`` exits 0 at once,
leaving the grandchildren (and the pipes they hold open) behind.
"""

import json
import subprocess
import sys
import time

SLEEP_FOREVER = [sys.executable, "-c", "import time\nwhile True: time.sleep(3600)"]

same_group = subprocess.Popen(SLEEP_FOREVER)
new_session = subprocess.Popen(SLEEP_FOREVER, start_new_session=True)
print(json.dumps({"same_group": same_group.pid, "new_session": new_session.pid}), flush=True)
if sys.argv[1:] == ["exit"]:
    sys.exit(0)
while True:
    time.sleep(3600)
