#!/usr/bin/env bash
# Fails early, with a clear message, when the file system here has less than $1 GiB free (a pip install that
# runs out of space stops halfway with "No space left on device").
set -euo pipefail
need=${1:?usage: check-space.sh GIB}
free=$(df -Pk . | awk 'NR == 2 { print int($4 / 1048576) }')
if [ "$free" -lt "$need" ]; then
  echo "check-space: the virtualenv needs about $need GiB; $free GiB free in $(pwd)" >&2
  exit 1
fi
