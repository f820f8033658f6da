#!/usr/bin/env bash
# The original sdv-provision's work, done the original way, for scripts/bench: two RSA-2048
# keys with `openssl genpkey`, two CSRs, two self-signed certificates with
# `openssl x509 -req -signkey`, two SHA-1 fingerprints, and one `jq` edit of the
# connector manifest. Everything happens under ROOT (a scratch tree), never on the host.
#
#   scripts/baseline-openssl.sh ROOT [DEVICE_ID] [ID_SCOPE]
set -euo pipefail
root=${1:?usage: baseline-openssl.sh ROOT [DEVICE_ID] [ID_SCOPE]}
id=${2:-52-54-21-4c-f9-5a}
scope=${3:-0ne0012345A}
certs="$root/data/var/certificates"
manifest="$root/data/var/containers/manifests/cloudconnector.json"
mkdir -p "$certs"
umask 077
for stem in device device2; do
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$certs/$stem.key" 2>/dev/null
    openssl req -new -key "$certs/$stem.key" -subj "/CN=$id" -out "$certs/$stem.csr"
    openssl x509 -req -in "$certs/$stem.csr" -signkey "$certs/$stem.key" -days 365 \
        -out "$certs/$stem.crt" 2>/dev/null
    rm -f "$certs/$stem.csr"
    openssl x509 -noout -fingerprint -sha1 -in "$certs/$stem.crt" | sed 's/.*=//; s/://g'
done
printf '%s\n' "$scope" > "$certs/azure.idscope"
jq --arg s "ID_SCOPE=$scope" '.config.env += [$s]' "$manifest" > "$manifest.tmp"
mv "$manifest.tmp" "$manifest"
