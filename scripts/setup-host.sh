#!/usr/bin/env bash
# Makes sure this machine can create a virtualenv and run a Mosquitto 2.x broker.
# Docker is used when an engine answers; otherwise the Debian packages are installed (as root, or via sudo).
set -euo pipefail

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else echo "setup-host: need root to run: $*" >&2; return 1
  fi
}

packages=()
python3 -c 'import venv, ensurepip' 2>/dev/null || packages+=(python3-venv)
if docker info >/dev/null 2>&1; then
  echo "setup-host: Docker engine answers; the broker runs in eclipse-mosquitto:2"
elif command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
  echo "setup-host: using the local mosquitto binary"
else
  packages+=(mosquitto mosquitto-clients)
fi
if [ ${#packages[@]} -gt 0 ]; then
  echo "setup-host: installing ${packages[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}"
fi
