#!/bin/sh
# The setup both image targets share (docker/Dockerfile runs it as root at build time):
# trust the extra CA file when it is not empty, install uv into /opt/tools, add the non-root
# user 1000. Usage: sh setup.sh PYTHON CA_FILE
# CA_FILE is the backend's copy of DYMU_CA_CERT_FILE in its build context (target `cell`) or
# compose's BuildKit secret (target `bench`): a file, so a whole system bundle fits (a build
# argument is one environment variable, capped at 128 KiB).
set -eu
python=$1
ca=$2
if [ -s "$ca" ]; then
  if ! grep -q -- '-----BEGIN CERTIFICATE-----' "$ca"; then
    echo "setup.sh: $ca holds no PEM certificate" >&2
    exit 1
  fi
  cp "$ca" /usr/local/share/ca-certificates/dymu-extra-ca.crt  # public certificates: readable by all
  chmod 644 /usr/local/share/ca-certificates/dymu-extra-ca.crt
  # a bundle of many CAs in one file goes into ca-certificates.crt whole; openssl's rehash warns
  # that it holds more than one certificate, which does not matter (SSL_CERT_FILE is the bundle)
  update-ca-certificates > /dev/null 2>&1
  grep -q -- '-----BEGIN CERTIFICATE-----' /etc/ssl/certs/ca-certificates.crt
  echo "setup.sh: trusting $(grep -c -- '-----BEGIN CERTIFICATE-----' "$ca") extra CA certificate(s)"
fi
"python$python" -m venv /opt/tools
/opt/tools/bin/pip install --no-cache-dir uv==0.13.9
chmod -R a+rX /opt/tools
if ! getent passwd 1000 > /dev/null; then useradd --uid 1000 --user-group --no-create-home dymu; fi
install -d -m 1777 /home/dymu
