#!/usr/bin/env bash
# What a TLS deployment with node authentication needs, made offline with openssl and ssh-keygen:
#   OUT/ca.crt, ca.key            a certificate authority (give ca.crt to every node and to whoever runs `flwr`)
#   OUT/server.pem, server.key    the SuperLink's certificate, for the name or IP address the nodes dial
#   OUT/node<I>, node<I>.pub      one ECDSA P-384 key pair per node (flwr's SuperNode authentication): node I keeps
#                                 node<I>; node<I>.pub is registered with `flwr supernode register`
# (An institution may make its own pair instead -- ssh-keygen -t ecdsa -b 384 -N "" -f node -- and send only the .pub.)
#
# usage: a2v_jax/deploy/make_certs.sh OUT SERVER NUM_NODES [DAYS]
#   SERVER: the SuperLink's host name or IP address as the nodes write it in --superlink (localhost and
#   127.0.0.1 are always added, so a loopback try works with the same files). DAYS: validity (default 825).
# Never overwrites: OUT must not hold a ca.key yet.
set -euo pipefail

if [[ $# -lt 3 || $# -gt 4 ]]; then
  echo "usage: $0 OUT SERVER NUM_NODES [DAYS]   (e.g. $0 certs lab.example.org 2)" >&2
  exit 2
fi
out=$1 server=$2 nodes=$3 days=${4:-825}
if ! [[ $nodes =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NUM_NODES must be a positive integer, got '$nodes'" >&2
  exit 2
fi
if ! [[ $days =~ ^[1-9][0-9]*$ ]]; then
  echo "error: DAYS must be a positive integer, got '$days'" >&2
  exit 2
fi
for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "error: $tool is not installed (it makes the keys)" >&2; exit 2; }
done
if [[ -e $out/ca.key ]]; then
  echo "error: $out/ca.key exists; refusing to replace the certificates a running deployment may use" \
       "(move $out away, or pick another OUT)" >&2
  exit 2
fi
mkdir -p "$out"
umask 077

if [[ $server =~ ^[0-9.]+$ || $server == *:* ]]; then san="IP:$server"; else san="DNS:$server"; fi
[[ $server == localhost ]] || san="$san,DNS:localhost"
[[ $server == 127.0.0.1 ]] || san="$san,IP:127.0.0.1"

openssl req -x509 -newkey rsa:4096 -sha256 -nodes -days "$days" -subj "/CN=a2v-jax deployment CA" \
  -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
openssl req -newkey rsa:4096 -sha256 -nodes -subj "/CN=$server" -addext "subjectAltName=$san" \
  -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san" > "$out/server.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -days "$days" \
  -sha256 -extfile "$out/server.ext" -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/server.pem"

for ((i = 0; i < nodes; i++)); do
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "a2v-jax node $i" -f "$out/node$i"
  chmod 644 "$out/node$i.pub"
done
echo "wrote $out: ca.crt (for every node and flwr), server.pem + server.key (the SuperLink, for $san)," \
     "node0..node$((nodes - 1)) (+ .pub) (SuperNode keys)"
