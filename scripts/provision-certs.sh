#!/usr/bin/env bash
# Makes the certificates of a FedMT federation with openssl: a CA, the broker's server certificate and one
# client certificate per identity, whose common name (CN) is the identity. The broker (use_identity_as_username)
# takes the CN as the MQTT username, so a device's certificate names its device id and the ACL applies to it.
#
#   scripts/provision-certs.sh --out DIR --server-host broker.lan [--server-host 10.0.0.5] aggregator jetson-01 ...
#
# Writes DIR/ca.crt, DIR/ca.key (keep it offline), DIR/server.{crt,key} and DIR/<id>.{crt,key}. Files that
# exist are kept, so running it again with a new id adds that id's certificate from the same CA.
set -euo pipefail

out=""
days=825
hosts=()
ids=()
usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="${2:?--out needs a folder}"; shift 2 ;;
    --server-host) hosts+=("${2:?--server-host needs a name or address}"); shift 2 ;;
    --days) days="${2:?--days needs a number}"; shift 2 ;;
    -h | --help) usage ;;
    -*) echo "provision-certs: unknown option $1" >&2; usage ;;
    *) ids+=("$1"); shift ;;
  esac
done
[ -n "$out" ] || { echo "provision-certs: --out DIR is required" >&2; usage; }
[ ${#hosts[@]} -gt 0 ] || hosts=(localhost 127.0.0.1)
for id in "${ids[@]}"; do  # the project's name rule (protocol/topics.py NAME_PATTERN)
  [[ "$id" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] || { echo "provision-certs: bad id '$id'" >&2; exit 2; }
done
command -v openssl >/dev/null || { echo "provision-certs: openssl is not installed" >&2; exit 1; }

umask 077
mkdir -p "$out"
cd "$out"

new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# sign NAME CN EXTENSIONS: NAME.key (made if missing) -> NAME.crt signed by the CA
sign() {
  local name="$1" cn="$2" extensions="$3"
  [ -f "$name.key" ] || new_key "$name.key"
  openssl req -new -key "$name.key" -subj "/CN=$cn" -out "$name.csr"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" -sha256 \
    -extfile <(printf '%s\n' "$extensions") -out "$name.crt" 2>/dev/null
  rm -f "$name.csr"
  chmod 644 "$name.crt"
  echo "provision-certs: $out/$name.crt (CN=$cn)"
}

if [ ! -f ca.crt ]; then
  new_key ca.key
  openssl req -x509 -new -key ca.key -subj "/CN=FedMT CA" -days $((days * 4)) -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt
  chmod 644 ca.crt
  echo "provision-certs: $out/ca.crt (new CA)"
fi

if [ ! -f server.crt ]; then
  san=""
  for host in "${hosts[@]}"; do
    if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then san+="IP:$host,"; else san+="DNS:$host,"; fi
  done
  sign server "${hosts[0]}" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=${san%,}"
fi

for id in "${ids[@]}"; do
  [ -f "$id.crt" ] && continue
  sign "$id" "$id" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
done
