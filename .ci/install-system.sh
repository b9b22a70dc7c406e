#!/usr/bin/env bash
# Debian packages the real-peer tests use: dcmtk (storescu/echoscu/storescp),
# Orthanc, PostgreSQL, openssl. Skips apt entirely when everything is already there.
set -euo pipefail
need=()
command -v storescu >/dev/null || need+=(dcmtk)
command -v Orthanc >/dev/null || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v openssl >/dev/null || need+=(openssl)  # certificates for the inbound TLS tests
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Orthanc and PostgreSQL are started by the tests themselves, on loopback.
service orthanc stop >/dev/null 2>&1 || true
service postgresql stop >/dev/null 2>&1 || true
