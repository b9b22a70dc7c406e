#!/usr/bin/env bash
# Debian packages the real-peer tests use: dcmtk (storescu/echoscu/storescp),
# Orthanc, PostgreSQL; buildah, podman, runc and debootstrap for the image tests
# (tools/image/build.sh, tests/container). Skips apt entirely when everything is
# already there. One check per line: `command -v TOOL || need+=(PACKAGE)`.
set -euo pipefail
need=()
command -v storescu >/dev/null || need+=(dcmtk)
command -v Orthanc >/dev/null || need+=(orthanc)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v buildah >/dev/null || need+=(buildah)
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Orthanc and PostgreSQL are started by the tests themselves, on loopback.
service orthanc stop >/dev/null 2>&1 || true
service postgresql stop >/dev/null 2>&1 || true
