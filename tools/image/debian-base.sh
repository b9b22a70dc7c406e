#!/usr/bin/env bash
# A Python base image root filesystem from Debian packages, for machines where
# python:3.11-slim cannot be pulled (no container registry reachable).
#
#   tools/image/debian-base.sh OUT.tar
#
# Writes OUT.tar: a root filesystem (debootstrap --variant=minbase of the Debian
# release this machine runs, plus python3 and python3-venv), numeric owners, "/"
# mode 0755 (a root made under a 0700 directory would keep 0700, and uid 10001
# could not even run /bin/sh). Needs root and debootstrap. The suite and the
# mirror come from this machine's apt sources; nothing is hard-coded.
# `recipe` prints what the result depends on (for the build cache key).
set -euo pipefail

PACKAGES=python3,python3-venv

suite() { . /etc/os-release; echo "${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}"; }

# The first apt source (deb822 .sources or one-line .list) that serves the suite.
mirror() {
  local s; s=$(suite)
  python3 - "$s" <<'EOF'
import glob, re, sys
suite = sys.argv[1]
files = sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
for path in files:
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.split()
        if "deb" in fields.get("types", []) and suite in fields.get("suites", []) and fields.get("enabled", ["yes"]) != ["no"]:
            print(fields["uris"][0]); sys.exit(0)
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        words = re.sub(r"\[[^]]*\]", "", line).split()
        if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
            print(words[1]); sys.exit(0)
sys.exit(f"no apt source for the suite {suite!r} in /etc/apt/sources.list*")
EOF
}

recipe() {
  echo "debian-minbase suite=$(suite) arch=$(dpkg --print-architecture) packages=$PACKAGES"
  sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1
}

build() {
  local out=$1 root s m
  command -v debootstrap >/dev/null || { echo "debian-base: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
  s=$(suite); m=$(mirror)
  work=$(mktemp -d "${out}.work.XXXXXX")
  trap 'rm -rf "${work:-}"' EXIT
  root="$work/root"
  mkdir -m 0755 "$root"
  echo "debian-base: debootstrap $s from $m with $PACKAGES" >&2
  debootstrap --variant=minbase --include="$PACKAGES" "$s" "$root" "$m" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  chroot "$root" python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "debian-base: $s's python3 is $(chroot "$root" python3 -V), clara-dicom needs Python >= 3.11" >&2; exit 1; }
  echo "debian-base: $(chroot "$root" python3 -V)" >&2
  # Caches and documentation go before the archive is made, so no image layer holds them.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
         "$root"/var/log/* "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
         "$root"/usr/share/locale/* "$root"/tmp/*
  chmod 0755 "$root"
  chmod 1777 "$root/tmp"
  tar --numeric-owner -C "$root" -cf "$out.partial" .
  mv "$out.partial" "$out"
}

case "${1:-}" in
  recipe) recipe ;;
  ""|-h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
  *) build "$1" ;;
esac
