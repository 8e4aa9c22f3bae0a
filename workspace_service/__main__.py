"""``python -m workspace_service``: serve the workspace service until SIGTERM."""

from common.service_main import run
from workspace_service.app import wiring

if __name__ == "__main__":
    run("workspace_service", lambda s: s.workspace_service_addr, wiring)
