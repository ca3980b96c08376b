"""Checks of a daemon's config against this machine: the files it names can be read, and the broker answers.

`check-config` prints them; `run` refuses to start on a file problem (one line) and warns when the broker does
not answer (the daemon keeps retrying). The broker probe never logs in: a CONNECT with the daemon's identity
would take over the running daemon's session (the client id is the username). On a password listener it sends
an anonymous CONNECT; over TLS none at all, since the certificate would name the identity.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from common.daemon import CommandError
from protocol.transport import MqttSettings

log = logging.getLogger(__name__)
#: how long the probe waits for a TLS alert after the handshake (a rejected client certificate, TLS 1.3)
ALERT_WAIT_S = 0.5


def file_problem(key: str, path: str | None) -> str | None:
    """Why the file a config key names cannot be read by this user, or None."""
    if path is None:
        return None
    target = Path(path)
    if not target.exists():
        return f"{key}: file {path} does not exist"
    if not target.is_file():
        return f"{key}: {path} is not a file"
    if not os.access(target, os.R_OK):
        return f"{key}: file {path} is not readable by user {getpass.getuser()}"
    return None


def state_dir_problem(key: str, path: str) -> str | None:
    """Why the daemon could not create or write its state directory, or None."""
    target = Path(path)
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        return f"{key}: {existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        verb = "write" if existing == target else f"create {path} in"
        return f"{key}: user {getpass.getuser()} cannot {verb} {existing}"
    return None


def mqtt_problems(settings: MqttSettings, key: str = "mqtt") -> list[str]:
    """The password file and TLS files the broker settings name: present, readable, non-empty, loadable."""
    problems = [file_problem(f"{key}.password_file", settings.password_file)]
    if settings.password_file and problems == [None] and not settings.resolved_password():
        problems.append(f"{key}.password_file: {settings.password_file} is empty")
    tls = settings.tls
    if tls is not None:
        files = {"ca_file": tls.ca_file, "cert_file": tls.cert_file, "key_file": tls.key_file}
        found = [file_problem(f"{key}.tls.{name}", path) for name, path in files.items()]
        problems += found
        if not any(found):
            try:
                tls_context(settings)
            except (ssl.SSLError, ValueError) as exc:
                problems.append(f"{key}.tls: the CA, certificate and key do not load together: {exc}")
    return [p for p in problems if p]


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """A client context as paho builds it: the CA verifies the broker (and its host name), the cert is ours."""
    assert settings.tls is not None
    context = ssl.create_default_context(cafile=settings.tls.ca_file)
    if settings.tls.cert_file:
        context.load_cert_chain(settings.tls.cert_file, settings.tls.key_file)
    return context


@dataclass(frozen=True)
class BrokerAnswer:
    answers: bool
    detail: str

    def line(self, settings: MqttSettings) -> str:
        where = f"broker {settings.host}:{settings.port}"
        if self.answers:
            return f"{where} answers ({self.detail})"
        return f"warning: {where} does not answer: {self.detail}"


def probe_broker(settings: MqttSettings, timeout_s: float = 3.0) -> BrokerAnswer:
    """Whether the broker accepts a connection: TCP, then with TLS the handshake with this config's CA and
    client certificate (a broker that rejects the certificate says so in an alert right after it)."""
    try:
        raw = socket.create_connection((settings.host, settings.port), timeout=timeout_s)
    except OSError as exc:
        return BrokerAnswer(False, _reason(exc))
    with raw:
        if settings.tls is None:
            return _anonymous_connect(raw)
        try:
            with tls_context(settings).wrap_socket(raw, server_hostname=settings.host) as conn:
                conn.settimeout(ALERT_WAIT_S)
                try:  # the broker waits for CONNECT: a timeout here means it accepted the certificate
                    closed = conn.recv(1) == b""
                except TimeoutError:
                    closed = False
                version = conn.version()
        except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
            return BrokerAnswer(False, f"TLS: {_reason(exc)}")
        if closed:
            return BrokerAnswer(False, "TLS: the broker closed the connection after the handshake")
        return BrokerAnswer(True, f"{version}, certificate accepted")


#: MQTT 3.1.1 CONNECT: clean session, keepalive 60 s, empty client id (the broker would assign one), no username
ANONYMOUS_CONNECT = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 0x02, 0, 60, 0, 0])
CONNACK_CODES = {
    0: "accepted",
    1: "bad protocol version",
    2: "client id rejected",
    3: "server unavailable",
    4: "bad username or password",
    5: "not authorised",
}


def _anonymous_connect(conn: socket.socket) -> BrokerAnswer:
    """An MQTT broker answers an anonymous CONNECT with a CONNACK (refused by the shipped config); it names
    no identity, so it touches no session. The daemon's password is checked when it connects."""
    try:
        conn.sendall(ANONYMOUS_CONNECT)
        reply = conn.recv(4)
    except OSError as exc:
        reply, why = b"", _reason(exc)
    else:
        why = "no CONNACK"
    if len(reply) < 4 or reply[0] != 0x20:
        return BrokerAnswer(
            False, f"no MQTT answer on this port ({why}; a TLS listener? then set [mqtt.tls])"
        )
    return BrokerAnswer(True, f"MQTT; an anonymous connection is {CONNACK_CODES.get(reply[3], reply[3])}")


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.replace("_", " ").lower()
    if isinstance(exc, TimeoutError):
        return "timed out"
    return exc.strerror or str(exc)


def report(summary: str, problems: list[str], settings: MqttSettings) -> int:
    """check-config's answer: the summary, one line per problem, whether the broker answers; exit code 2 when
    a file problem would stop the daemon (a silent broker does not: the daemon keeps retrying)."""
    print(f"{'ok' if not problems else 'config'}: {summary}")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    print(probe_broker(settings).line(settings))
    return 2 if problems else 0


def before_run(problems: list[str], settings: MqttSettings) -> None:
    """Refuse to start on a file problem (one line); warn when the broker does not answer."""
    if problems:
        raise CommandError("; ".join(problems))
    answer = probe_broker(settings)
    if not answer.answers:
        log.warning("%s; retrying in the background", answer.line(settings).removeprefix("warning: "))
