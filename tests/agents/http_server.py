"""Test dev server: answers HTTP on 127.0.0.1, on the port in ``$PORT``.

Paths: ``/`` answers ``$STATUS`` (default 200); ``/env`` the environment as JSON;
``/pids`` ``{"pid": <this process>, "child": <its child or null>}``.

Environment:
- ``PORT_ENV``: the variable holding the port instead of ``PORT``;
- ``READY_DELAY_S``: seconds to wait before listening (a slow start);
- ``SPAWN_CHILD=1``: start a child that sleeps forever in the same process group, so
  the service is a process tree;
- ``BOOT_MESSAGE``: a line written to stderr before listening.

Arguments are ignored: tests pass a marker to find their processes.
"""

import json
import os
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

SLEEP_FOREVER = [sys.executable, "-c", "import time\nwhile True: time.sleep(3600)", *sys.argv[1:]]


class Handler(BaseHTTPRequestHandler):
    child_pid: int | None = None

    def do_GET(self) -> None:
        if self.path == "/env":
            self._answer(200, dict(os.environ))
        elif self.path == "/pids":
            self._answer(200, {"pid": os.getpid(), "child": Handler.child_pid})
        else:
            self._answer(int(os.environ.get("STATUS", "200")), {"ok": True})

    def _answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the service log keeps what the test wrote, not one line per probe."""


def main() -> None:
    port = int(os.environ[os.environ.get("PORT_ENV", "PORT")])
    if os.environ.get("BOOT_MESSAGE"):
        print(os.environ["BOOT_MESSAGE"], file=sys.stderr, flush=True)
    if os.environ.get("SPAWN_CHILD") == "1":
        Handler.child_pid = subprocess.Popen(SLEEP_FOREVER).pid
    time.sleep(float(os.environ.get("READY_DELAY_S", "0")))
    server = HTTPServer(("127.0.0.1", port), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
