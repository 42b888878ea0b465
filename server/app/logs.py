"""Logging set-up for the CLI, the supervisor and every worker process."""

import logging
import os


def setup_logging(role: str, level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s [{role} pid={os.getpid()}] %(name)s: %(message)s",
    )
    # websockets logs every connection and HTTP response at INFO: thousands a second under load.
    logging.getLogger("websockets").setLevel(logging.WARNING)
