#!/usr/bin/env bash
# The TPM provisioning work done by hand with tpm2-tools and the OpenSSL tpm2 provider,
# for scripts/bench: for each of two identities, `tpm2_create` an ECC P-256 signing key
# (scheme null, the attributes sdv-provision uses) under the SRK at 0x81000001,
# `tpm2_load` it, `tpm2_evictcontrol` it to a persistent handle, self-sign a certificate
# with `openssl req -x509 -provider tpm2 -provider default -key handle:0x…`, and print
# its SHA-1 fingerprint. Blobs and certificates go under OUT (a scratch dir).
#
#   TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port=P scripts/baseline-tpm.sh OUT [DEVICE_ID]
#
# The provider gets the same TCTI (TPM2OPENSSL_TCTI). swtpm has no resource manager, so
# the transient objects `tpm2_load` and the provider leave in the TPM stay there and the
# second key's `tpm2_create` fails with "out of memory for object contexts" (swtpm holds
# 3). Hence one `tpm2_flushcontext -t` per key (timed; on a device /dev/tpmrm0 does this
# when each process exits). sdv-provision flushes its own transients too.
set -euo pipefail
out=${1:?usage: baseline-tpm.sh OUT [DEVICE_ID]}
id=${2:-52-54-21-4c-f9-5a}
: "${TPM2TOOLS_TCTI:?set TPM2TOOLS_TCTI}"
export TPM2OPENSSL_TCTI=${TPM2OPENSSL_TCTI:-$TPM2TOOLS_TCTI} TSS2_LOG=${TSS2_LOG:-all+none}
mkdir -p "$out"
umask 077
for pair in device:0x81000010 device2:0x81000011; do
    stem=${pair%%:*} handle=${pair#*:}
    tpm2_create -Q -C 0x81000001 -G ecc256 \
        -a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign' \
        -u "$out/$stem.tpm.pub" -r "$out/$stem.tpm.priv"
    tpm2_load -Q -C 0x81000001 -u "$out/$stem.tpm.pub" -r "$out/$stem.tpm.priv" -c "$out/$stem.ctx"
    tpm2_evictcontrol -Q -C o -c "$out/$stem.ctx" "$handle"
    openssl req -x509 -provider tpm2 -provider default -key "handle:$handle" \
        -subj "/CN=$id" -days 365 -sha256 -out "$out/$stem.crt"
    tpm2_flushcontext -t
    openssl x509 -noout -fingerprint -sha1 -in "$out/$stem.crt" | sed 's/.*=//; s/://g'
done
