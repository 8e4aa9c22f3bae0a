"""``python -m issue_service``."""

from common.service_main import run
from issue_service.app import wiring

if __name__ == "__main__":
    run(
        "issue_service",
        lambda settings: settings.issue_service_addr,
        wiring,
    )
