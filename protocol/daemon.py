"""Process plumbing shared by both daemons: logging, and a stop event set by SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def stop_on_signals() -> threading.Event:
    """An event set on SIGTERM or SIGINT (systemd stop, Ctrl-C), for a clean shutdown."""
    stop = threading.Event()

    def handler(signum, frame) -> None:
        logging.getLogger(__name__).info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop
