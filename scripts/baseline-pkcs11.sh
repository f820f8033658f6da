#!/usr/bin/env bash
# The PKCS#11 provisioning work done by hand, for scripts/bench: for each of two
# identities, `pkcs11-tool --keypairgen` an EC P-256 key pair in the token, self-sign a
# certificate with `openssl req -x509 -engine pkcs11` through the token's key, and print
# its SHA-1 fingerprint. Certificates go under OUT (a scratch dir).
#
#   scripts/baseline-pkcs11.sh OUT PIN_FILE [DEVICE_ID]
#
# Needs PKCS11_MODULE_PATH, SOFTHSM2_CONF (or another module's config) and an
# OPENSSL_CONF that loads the pkcs11 engine with init = 0 (scripts/bench writes one).
# Like most such scripts, it hands the PIN to pkcs11-tool and openssl on their command
# lines (visible to `ps`): one of the things sdv-provision does not do.
set -euo pipefail
out=${1:?usage: baseline-pkcs11.sh OUT PIN_FILE [DEVICE_ID]}
pin=$(head -n1 "${2:?usage: baseline-pkcs11.sh OUT PIN_FILE [DEVICE_ID]}")
id=${3:-52-54-21-4c-f9-5a}
: "${PKCS11_MODULE_PATH:?set PKCS11_MODULE_PATH}"
mkdir -p "$out"
for pair in primary:01 secondary:02; do
    role=${pair%%:*} kid=${pair#*:}
    pkcs11-tool --module "$PKCS11_MODULE_PATH" --token-label leda --login --pin "$pin" \
        --keypairgen --key-type EC:prime256v1 --label "device-$role" --id "$kid" >/dev/null 2>&1
    openssl req -x509 -engine pkcs11 -keyform engine \
        -key "pkcs11:token=leda;object=device-$role;id=%$kid;type=private;pin-value=$pin" \
        -subj "/CN=$id" -days 365 -sha256 -out "$out/$role.crt" 2>/dev/null
    openssl x509 -noout -fingerprint -sha1 -in "$out/$role.crt" | sed 's/.*=//; s/://g'
done
