#!/usr/bin/env bash
# Debian packages the real-peer tests use: dcmtk (storescu/echoscu/storescp),
# Orthanc and its DICOMweb plugin, PostgreSQL, openssl (test certificates);
# buildah, podman, runc and debootstrap for the image tests (tools/image/build.sh,
# tests/container); containerd, the CNI plugins and a static busybox for the e2e
# real node (e2e/real_node.py); iptables (a database cut off by the network,
# tests/test_journal_postgres.py). Skips apt entirely when everything is already
# there. One check per line: `command -v TOOL || need+=(PACKAGE)`.
set -euo pipefail
need=()
command -v storescu >/dev/null || need+=(dcmtk)
command -v Orthanc >/dev/null || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v openssl >/dev/null || need+=(openssl)
command -v buildah >/dev/null || need+=(buildah)
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v containerd >/dev/null || need+=(containerd)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)  # static: it runs alone in an image
command -v iptables >/dev/null || need+=(iptables)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Orthanc and PostgreSQL are started by the tests themselves, on loopback.
service orthanc stop >/dev/null 2>&1 || true
service postgresql stop >/dev/null 2>&1 || true
# containerd too: each real node starts its own, with everything under its test directory.
service containerd stop >/dev/null 2>&1 || true
