"""Start a real Mosquitto 2.x broker for tests and the demo: in Docker when an engine answers, else the binary.

The broker runs the shipped config (broker_config/mosquitto.conf: every setting, with this broker's paths and
port) and the project's own ACL (broker_config/acl) with generated credentials, so tests exercise the same
authorisation rules and limits as production. It serves one listener: the shipped localhost listener with
passwords, or, given a certificate folder made by scripts/provision-certs.sh, the shipped TLS listener only.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BROKER_CONFIG_DIR = Path(__file__).resolve().parent.parent / "broker_config"
ACL_FILE = BROKER_CONFIG_DIR / "acl"
SHIPPED_CONFIG = BROKER_CONFIG_DIR / "mosquitto.conf"
DOCKER_IMAGE = "eclipse-mosquitto:2"
CONTAINER_CONFIG_DIR = "/mosquitto/config"
CONTAINER_DATA_DIR = "/mosquitto/data"
CERT_FILES = ("ca.crt", "server.crt", "server.key")  # what the broker needs of a provisioned folder


class BrokerUnavailable(RuntimeError):
    """Neither a Docker engine nor a mosquitto binary can run a broker here."""


def password_line(user: str, password: str) -> str:
    """A mosquitto_passwd line (PBKDF2-SHA512, the `$7$` format of Mosquitto 2.0)."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return f"{user}:$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def docker_available() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )


@dataclass
class Mosquitto:
    """A broker on 127.0.0.1:`port` with the given users (password listener), or TLS-only with client
    certificates when `certs` names a folder made by scripts/provision-certs.sh; use as a context manager or
    start()/stop()."""

    workdir: Path
    users: dict[str, str]
    port: int = field(default_factory=free_port)
    use_docker: bool | None = None
    host: str = "127.0.0.1"
    certs: Path | None = None
    extra_acl: str = ""  # ACL lines appended to the shipped ACL (a benchmark's own topics)
    _process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _container: str | None = field(default=None, init=False, repr=False)

    def start(self, timeout_s: float = 30.0) -> Mosquitto:
        docker = docker_available() if self.use_docker is None else self.use_docker
        binary = None if docker else mosquitto_binary()
        if not docker and binary is None:
            raise BrokerUnavailable(
                "no Docker engine answers and no mosquitto binary is installed: "
                "run `sudo apt-get install mosquitto` or start Docker"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_dir = "/mosquitto/config" if docker else str(self.workdir)
        data_dir = "/mosquitto/data" if docker else str(self.workdir / "data")
        (self.workdir / "data").mkdir(exist_ok=True)
        (self.workdir / "passwd").write_text(
            "".join(password_line(u, p) + "\n" for u, p in self.users.items())
        )
        (self.workdir / "acl").write_text(ACL_FILE.read_text() + self.extra_acl)
        if self.certs is not None:
            (self.workdir / "certs").mkdir(exist_ok=True)
            for name in CERT_FILES:
                shutil.copyfile(self.certs / name, self.workdir / "certs" / name)
                os.chmod(self.workdir / "certs" / name, 0o644)  # the container's mosquitto user reads them
        (self.workdir / "mosquitto.conf").write_text(self._config(config_dir, data_dir, docker))
        for name in ("passwd", "acl", "mosquitto.conf"):
            os.chmod(self.workdir / name, 0o644)
        if docker:
            self._container = f"fedmt-mosquitto-{self.port}"
            subprocess.run(
                [
                    "docker",
                    "run",
                    "-d",
                    "--rm",
                    "--name",
                    self._container,
                    "-p",
                    f"{self.host}:{self.port}:1883",
                    "-v",
                    f"{self.workdir}:/mosquitto/config",
                    DOCKER_IMAGE,
                ],
                check=True,
                capture_output=True,
            )
        else:
            log = open(self.workdir / "mosquitto.log", "ab")
            self._process = subprocess.Popen(
                [binary, "-c", str(self.workdir / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_ready(timeout_s)
        return self

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
            self._process = None
        if self._container is not None:
            subprocess.run(["docker", "stop", self._container], capture_output=True)
            self._container = None

    @property
    def pid(self) -> int | None:
        """The broker's process id (None in Docker or when stopped)."""
        return self._process.pid if self._process is not None else None

    def restart(self) -> None:
        """Stop and start on the same port and data directory (persistence keeps retained messages)."""
        self.stop()
        self.start()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _config(self, config_dir: str, data_dir: str, docker: bool) -> str:
        """The shipped config with this broker's directories, log and listener (see the module docstring)."""
        listener = "listener 1883" if docker else f"listener {self.port} {self.host}"
        log = "log_dest stdout" if docker else f"log_dest file {self.workdir / 'mosquitto.log'}"
        # As root the binary would drop to the `mosquitto` user, which cannot write our work directory.
        stay_root = ["user root"] if not docker and os.geteuid() == 0 else []
        common, listeners = shipped_sections(SHIPPED_CONFIG.read_text())
        tls = self.certs is not None
        (served,) = [block for block in listeners if ("certfile" in " ".join(block)) == tls]
        lines = stay_root + [
            log if line.startswith("log_dest ") else line for line in common if not line.startswith("user ")
        ]
        lines += [listener, *served[1:]]
        text = "\n".join(lines) + "\n"
        return text.replace(f"{CONTAINER_CONFIG_DIR}/", f"{config_dir}/").replace(
            f"{CONTAINER_DATA_DIR}/", f"{data_dir}/"
        )

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                log = (self.workdir / "mosquitto.log").read_text(errors="replace")[-2000:]
                raise BrokerUnavailable(f"mosquitto exited with code {self._process.returncode}:\n{log}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise BrokerUnavailable(
            f"mosquitto did not accept connections on {self.host}:{self.port} in {timeout_s:.0f} s"
        )


def shipped_sections(text: str) -> tuple[list[str], list[list[str]]]:
    """A mosquitto.conf as (its settings before the first listener, one list of lines per listener block,
    starting with its `listener` line); comments and blank lines dropped."""
    common: list[str] = []
    listeners: list[list[str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("listener "):
            listeners.append([line])
        elif listeners and line.split()[0] in LISTENER_OPTIONS:
            listeners[-1].append(line)
        else:
            common.append(line)
    return common, listeners


#: the options of the shipped config that belong to the listener above them (mosquitto.conf(5))
LISTENER_OPTIONS = frozenset(
    "cafile capath certfile keyfile require_certificate use_identity_as_username use_subject_as_username "
    "use_username_as_clientid tls_version ciphers ciphers_tls1.3 crlfile max_connections protocol "
    "socket_domain bind_interface mount_point http_dir".split()
)
