"""Process plumbing shared by both daemons: the CLI entry, logging, a stop event set by SIGTERM/SIGINT, and the
fence around the handling of one input."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from common.config import ConfigError
from protocol import ProtocolError


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
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 2


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


@contextmanager
def drop_on_error(log: logging.Logger, item: object) -> Iterator[None]:
    """Handle one input (a message, an event): any error drops it with one log line and the service goes on.

    A ProtocolError is bad input (a warning); anything else is an error of this service, logged as such with
    its traceback at DEBUG level.
    """
    try:
        yield
    except ProtocolError as exc:
        log.warning("dropped %s: %.500s", _describe(item), exc)
    except Exception as exc:  # noqa: BLE001 - the fence: no single input may stop a service
        log.error("dropped %s: %s: %.500s", _describe(item), type(exc).__name__, exc)
        log.debug("traceback of the dropped input", exc_info=True)


def _describe(item: object) -> str:
    topic = getattr(item, "topic", None)
    return f"message on {topic[:200]!r}" if isinstance(topic, str) else type(item).__name__
