"""``python -m run_service``: serve the run service until SIGTERM."""

from common.service_main import run
from run_service.app import wiring

if __name__ == "__main__":
    run("run_service", lambda s: s.run_service_addr, wiring)
