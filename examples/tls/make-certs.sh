#!/usr/bin/env bash
# Demo certificates for config.example.yaml's sms-gateway route. DEMO ONLY: the private
# keys are committed to a public repository, so anyone has them. Never trust this CA or
# present these certificates anywhere but on your own machine.
#
#   bash examples/tls/make-certs.sh      (replaces the files; needs openssl)
#
# Writes, next to this script (EC P-256 keys, SHA-256, every certificate valid 10 years):
#   ca.pem                       a demo CA, "sidecar demo CA"; its key is thrown away, so
#                                nothing else can ever be signed by it
#   client.pem, client-key.pem   a client certificate the CA signed (extendedKeyUsage
#                                clientAuth): what the sidecar presents upstream (mTLS)
#   server.pem, server-key.pem   a server certificate the CA signed (serverAuth) for
#                                sms-gateway.example, localhost and 127.0.0.1: a stand-in
#                                provider to try the route against (see README.md here)
set -euo pipefail

cd "$(dirname "$0")"
DAYS=3650
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }
serial() { echo "0x$(openssl rand -hex 16)"; }

cat >"$work/extensions.cnf" <<'CNF'
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:sms-gateway.example, DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF

# The CA: self-signed; its key lives only in $work.
key "$work/ca-key.pem"
openssl req -new -x509 -config "$work/extensions.cnf" -extensions ca \
    -key "$work/ca-key.pem" -subj "/CN=sidecar demo CA" \
    -days "$DAYS" -sha256 -set_serial "$(serial)" -out ca.pem

# A leaf certificate signed by the CA: sign NAME COMMON_NAME EXTENSIONS
sign() {
    key "$1-key.pem"
    openssl req -new -config "$work/extensions.cnf" -key "$1-key.pem" -subj "/CN=$2" \
        -out "$work/$1.csr"
    openssl x509 -req -in "$work/$1.csr" -CA ca.pem -CAkey "$work/ca-key.pem" \
        -extfile "$work/extensions.cnf" -extensions "$3" \
        -days "$DAYS" -sha256 -set_serial "$(serial)" -out "$1.pem" 2>/dev/null
    chmod 0644 "$1-key.pem" # demo keys: readable by the sidecar's user in a container too
}
sign client "sidecar demo client" client
sign server "sms-gateway.example" server

for cert in client server; do
    openssl verify -CAfile ca.pem "$cert.pem" >/dev/null
done
for cert in ca client server; do
    printf '%-11s %s\n' "$cert.pem" "$(openssl x509 -in "$cert.pem" -noout -enddate)"
done
