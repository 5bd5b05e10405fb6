#!/usr/bin/env bash
# make_pki.sh DIR: writes a throwaway test PKI for the TLS scenarios into DIR
# (created if missing) with the openssl CLI.  All keys are EC P-256 (PKCS#8 PEM),
# all certificates X.509 v3, valid for 2 days:
#
#   ca.pem / ca.key                          self-signed CA ("Warren conformance CA")
#   server.pem / server.key                  CN=localhost, SAN IP:127.0.0.1, DNS:localhost, serverAuth
#   client-guest.pem / client-guest.key      CN=guest   (an existing user: SASL EXTERNAL logs in as guest)
#   client-tlsuser.pem / client-tlsuser.key  CN=tlsuser (no such user: SASL EXTERNAL must be refused)
#
# The client certificates carry clientAuth; both are signed by the CA.
set -euo pipefail

dir=${1:?usage: make_pki.sh DIR}
mkdir -p "$dir"
cd "$dir"
command -v openssl >/dev/null 2>&1 || { echo "make_pki.sh: openssl not found" >&2; exit 1; }

# a self-contained config, so the system openssl.cnf's defaults play no part
cat >openssl.cnf <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca.key
openssl req -config openssl.cnf -x509 -new -key ca.key -subj "/CN=Warren conformance CA" \
    -days 2 -extensions ca -out ca.pem

# leaf NAME SUBJECT EXTENSIONS: NAME.key and NAME.pem, signed by the CA
leaf() {
    key "$1.key"
    openssl req -config openssl.cnf -new -key "$1.key" -subj "$2" -out "$1.csr"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -set_serial "0x$(openssl rand -hex 8)" \
        -days 2 -extfile openssl.cnf -extensions "$3" -out "$1.pem" 2>/dev/null
    rm -f "$1.csr"
}
leaf server "/CN=localhost" server
leaf client-guest "/CN=guest" client
leaf client-tlsuser "/CN=tlsuser" client

openssl verify -CAfile ca.pem -purpose sslserver server.pem >/dev/null
openssl verify -CAfile ca.pem -purpose sslclient client-guest.pem client-tlsuser.pem >/dev/null
