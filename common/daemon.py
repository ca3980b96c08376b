"""Process plumbing shared by both daemons: the CLI entry, logging, a stop event set by SIGTERM/SIGINT, the
fence around the handling of one input, and systemd's notification protocol (Type=notify: READY=1, WATCHDOG=1
pings from the main loop, STOPPING=1)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from common.config import ConfigError
from protocol import ProtocolError

log = logging.getLogger(__name__)


class CommandError(Exception):
    """A command that cannot run here, explained in one line for the operator."""


def cli_parser(prog: str, description: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """A parser with --log-level and required subcommands."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    return parser, parser.add_subparsers(dest="command", required=True)


def cli_main(
    parser: argparse.ArgumentParser,
    commands: Mapping[str, Callable[[argparse.Namespace], int]],
    argv: list[str] | None,
    errors: tuple[type[Exception], ...] = (),
) -> int:
    """Parse, set up logging, run the subcommand; a bad config file (or one of `errors`) is one clear line
    on stderr and exit code 2."""
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return commands[args.command](args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
    except (CommandError, *errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 2


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def stop_on_signals(notifier: SystemdNotifier | None = None) -> threading.Event:
    """An event set on SIGTERM or SIGINT (systemd stop, Ctrl-C), for a clean shutdown; tells systemd too."""
    stop = threading.Event()

    def handler(signum, frame) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        if notifier is not None:
            notifier.stopping()
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


class SystemdNotifier:
    """sd_notify(3) without libsystemd: datagrams to $NOTIFY_SOCKET. `alive()`, called on every pass of the
    daemon's main loop, says READY=1 the first time and WATCHDOG=1 every half of $WATCHDOG_USEC, so a loop that
    hangs is restarted by systemd. Outside systemd (no socket) every call does nothing."""

    def __init__(self, socket_path: str | None, watchdog_s: float | None) -> None:
        self.address = "\0" + socket_path[1:] if socket_path and socket_path.startswith("@") else socket_path
        self.ping_every_s = watchdog_s / 2 if watchdog_s else None
        self._ready = False
        self._next_ping = 0.0

    @classmethod
    def from_environment(cls) -> SystemdNotifier:
        """The notifier systemd asked for; the variables are removed so task processes do not inherit them."""
        path = os.environ.pop("NOTIFY_SOCKET", None)
        usec = os.environ.pop("WATCHDOG_USEC", None)
        pid = os.environ.pop("WATCHDOG_PID", None)
        for_us = usec and usec.isdigit() and (pid is None or pid == str(os.getpid()))
        return cls(path, int(usec) / 1e6 if for_us else None)

    def alive(self) -> None:
        if not self._ready:
            self._ready = True
            self.notify("READY=1", f"MAINPID={os.getpid()}")
        now = time.monotonic()
        if self.ping_every_s and now >= self._next_ping:
            self._next_ping = now + self.ping_every_s
            self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def notify(self, *assignments: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", self.address, exc)


@contextmanager
def drop_on_error(
    log: logging.Logger, item: object, dropped: Callable[[], None] = lambda: None
) -> Iterator[None]:
    """Handle one input (a message, an event): any error drops it with one log line (and `dropped()`, to count
    it) and the service goes on.

    A ProtocolError is bad input (a warning); anything else is an error of this service, logged as such with
    its traceback at DEBUG level.
    """
    try:
        yield
    except ProtocolError as exc:
        log.warning("dropped %s: %.500s", _describe(item), exc)
        dropped()
    except Exception as exc:  # noqa: BLE001 - the fence: no single input may stop a service
        log.error("dropped %s: %s: %.500s", _describe(item), type(exc).__name__, exc)
        log.debug("traceback of the dropped input", exc_info=True)
        dropped()


def _describe(item: object) -> str:
    topic = getattr(item, "topic", None)
    return f"message on {topic[:200]!r}" if isinstance(topic, str) else type(item).__name__
