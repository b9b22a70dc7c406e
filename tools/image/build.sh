#!/usr/bin/env bash
# Build (or reuse) the clara-dicom container image. `make image` runs this.
#
#   tools/image/build.sh
#
# Result: the image clara-dicom:<version> (version from pyproject.toml), also
# tagged docker.io/library/clara-dicom:<version>, which is how Kubernetes spells
# the chart's default `image: clara-dicom:<version>`; and a docker-archive of it at
#   ~/.cache/clara-dicom/image/clara-dicom-<version>-<hash>.tar
# (load it with `podman load -i`, `docker load -i`, `kind load image-archive`,
# `ctr -n k8s.io images import`). The last two lines on stdout are
#   image=clara-dicom:<version>
#   archive=<path of the archive>
# everything else goes to stderr.
#
# Engine: docker when a docker daemon answers, else buildah (root, storage driver
# vfs: podman here runs on vfs too, and both must see the same images). Base:
# $PYTHON_IMAGE if set; else python:3.11-slim when present or pullable; else a base
# built from Debian packages (tools/image/debian-base.sh), said so on stderr.
# Cache: <hash> covers the Dockerfile, .dockerignore, the build context, these
# scripts and the base recipe. An image with that hash in the engine's storage is
# reused as is; else the archive is loaded; else it is built and archived. The
# Debian base root filesystem is cached as debian-base-<hash>.tar next to it.
#
# Environment: PYTHON_IMAGE, CLARA_IMAGE_ENGINE (docker|buildah),
# CLARA_IMAGE_CACHE (default ~/.cache/clara-dicom/image),
# CLARA_IMAGE_CA (CA bundle for pip during the build; default: the host's bundle).
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=tools/image
NAME=clara-dicom
VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
CACHE=${CLARA_IMAGE_CACHE:-$HOME/.cache/clara-dicom/image}
CA=${CLARA_IMAGE_CA:-/etc/ssl/certs/ca-certificates.crt}
DEFAULT_BASE=python:3.11-slim
LABEL_HASH=io.clara-dicom.content-hash

say() { echo "image: $*" >&2; }
die() { echo "image: $*" >&2; exit 1; }

mkdir -p "$CACHE"
exec 9>"$CACHE/build.lock"
flock 9  # one build at a time (make image, CI, tests)

# ---- engine
if [ -n "${CLARA_IMAGE_ENGINE:-}" ]; then
  ENGINE=$CLARA_IMAGE_ENGINE
elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  ENGINE=docker
elif command -v buildah >/dev/null; then
  ENGINE=buildah
else
  die "no docker daemon answers and buildah is not installed (apt-get install buildah)"
fi
case $ENGINE in
  docker)
    export DOCKER_BUILDKIT=1  # RUN --mount=type=secret
    has_image() { docker image inspect "$1" >/dev/null 2>&1; }
    pull() { docker pull -q "$1" >/dev/null 2>&1; }
    label_of() { docker image inspect --format "{{ index .Config.Labels \"$LABEL_HASH\" }}" "$1" 2>/dev/null || true; }
    bud() { docker build --network host "$@"; }
    tag() { docker tag "$1" "$2"; }
    save() { docker save -o "$2" "$1"; }
    load() { docker load -q -i "$1" >/dev/null; }
    size_of() { echo "$(( $(docker image inspect --format '{{.Size}}' "$1") / 1000000 )) MB"; }
    id_of() { docker image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }
    rmi_untagged() { [ -z "$(docker image inspect --format '{{join .RepoTags ""}}' "$1" 2>/dev/null)" ] && docker rmi "$1" >/dev/null 2>&1 || true; }
    ;;
  buildah)
    B=(buildah --storage-driver vfs)
    has_image() { "${B[@]}" inspect --type image "$1" >/dev/null 2>&1; }
    pull() { "${B[@]}" pull -q "$1" >/dev/null 2>&1; }
    label_of() { "${B[@]}" inspect --type image --format "{{ index .OCIv1.Config.Labels \"$LABEL_HASH\" }}" "$1" 2>/dev/null || true; }
    # chroot isolation and the host's network: RUN steps only need PyPI, and this
    # avoids depending on runc, cgroups and a NAT bridge inside a build. No --layers:
    # on vfs every cached step is a full copy of the root filesystem, which costs
    # more than the steps it would save (the archive is the cache).
    # Explicit rlimits no higher than the current ones: raising them is refused here.
    NOFILE=$(ulimit -Sn); [ "$NOFILE" = unlimited ] || [ "$NOFILE" -gt 65536 ] && NOFILE=65536
    NPROC=$(ulimit -Su); [ "$NPROC" = unlimited ] || [ "$NPROC" -gt 16384 ] && NPROC=16384
    bud() { "${B[@]}" bud --isolation chroot --network host \
              --ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC" "$@"; }
    tag() { "${B[@]}" tag "$1" "$2"; }
    save() { "${B[@]}" push -q "$1" "docker-archive:$2:docker.io/library/$NAME:$VERSION" >/dev/null; }
    load() { "${B[@]}" pull -q "docker-archive:$1" >/dev/null; }
    size_of() { "${B[@]}" images --noheading --format "{{.Size}}" "$1" | head -1; }
    id_of() { "${B[@]}" inspect --type image --format '{{.FromImageID}}' "$1" 2>/dev/null || true; }
    rmi_untagged() { "${B[@]}" images --noheading --no-trunc --format '{{.ID}} {{.Name}}' \
                       | awk -v id="sha256:$1" '$1 == id && $2 != "<none>" { tagged = 1 } END { exit tagged }' \
                       && "${B[@]}" rmi "$1" >/dev/null 2>&1 || true; }
    ;;
  *) die "CLARA_IMAGE_ENGINE must be docker or buildah, not $ENGINE" ;;
esac
say "engine: $ENGINE"

# ---- base
DEBIAN_BASE=""
if [ -n "${PYTHON_IMAGE:-}" ]; then
  BASE=$PYTHON_IMAGE
  BASE_KEY="image $BASE"
elif has_image "$DEFAULT_BASE" || pull "docker.io/library/$DEFAULT_BASE"; then
  BASE=$DEFAULT_BASE
  BASE_KEY="image $BASE"
else
  BASE_KEY=$(bash $HERE/debian-base.sh recipe)
  base_hash=$(printf '%s\n' "$BASE_KEY" | sha256sum | cut -c1-12)
  BASE=localhost/$NAME-base:$base_hash
  DEBIAN_BASE=$CACHE/debian-base-$base_hash.tar
  say "$DEFAULT_BASE cannot be pulled here: the base is $BASE, built from Debian packages ($(head -1 <<<"$BASE_KEY"))"
fi

# ---- content hash of everything the image is made of
content_hash() {
  {
    printf '%s\n' "version=$VERSION" "base=$BASE_KEY"
    find Dockerfile .dockerignore pyproject.toml README.md clara_dicom adapter operator results \
         $HERE/build.sh $HERE/debian-base.sh -type f \
         ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*.egg-info/*' -print0 \
      | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-16
}
HASH=$(content_hash)
IMAGE=$NAME:$VERSION
ARCHIVE=$CACHE/$NAME-$VERSION-$HASH.tar

finish() {
  tag "$IMAGE" "docker.io/library/$IMAGE" 2>/dev/null || true
  say "$IMAGE ready ($(size_of "$IMAGE"), content hash $HASH)"
  echo "image=$IMAGE"
  echo "archive=$ARCHIVE"
  exit 0
}

if [ "$(label_of "$IMAGE")" = "$HASH" ] && [ -s "$ARCHIVE" ]; then
  say "up to date in $ENGINE storage"
  finish
fi
if [ -s "$ARCHIVE" ]; then
  say "loading the cached archive $ARCHIVE"
  load "$ARCHIVE"
  tag "docker.io/library/$IMAGE" "$IMAGE" 2>/dev/null || true
  [ "$(label_of "$IMAGE")" = "$HASH" ] && finish
  say "the archive did not hold the expected image: rebuilding"
fi

# ---- build the Debian base if that is the base
if [ -n "$DEBIAN_BASE" ] && ! has_image "$BASE"; then
  if [ ! -s "$DEBIAN_BASE" ]; then
    say "debootstrap (a few minutes; cached as $DEBIAN_BASE)"
    bash $HERE/debian-base.sh "$DEBIAN_BASE"
  fi
  ctx=$(mktemp -d "$CACHE/base-context.XXXXXX")
  ln "$DEBIAN_BASE" "$ctx/rootfs.tar" 2>/dev/null || cp "$DEBIAN_BASE" "$ctx/rootfs.tar"
  printf '%s\n' 'FROM scratch' 'ADD rootfs.tar /' 'ENV LANG=C.UTF-8' 'CMD ["python3"]' > "$ctx/Containerfile"
  bud -q -t "$BASE" -f "$ctx/Containerfile" "$ctx" >/dev/null
  rm -rf "$ctx"
fi

# ---- build, tag, archive
secret=()
[ -s "$CA" ] && secret=(--secret "id=ca,src=$CA")
say "building $IMAGE on $BASE"
previous=$(id_of "$IMAGE")
bud "${secret[@]}" --build-arg "PYTHON_IMAGE=$BASE" --build-arg "VERSION=$VERSION" \
    --label "$LABEL_HASH=$HASH" -t "$IMAGE" -f Dockerfile . >&2
tag "$IMAGE" "docker.io/library/$IMAGE"
rm -f "$CACHE/$NAME-$VERSION-"*.tar.partial
save "$IMAGE" "$ARCHIVE.partial"
mv "$ARCHIVE.partial" "$ARCHIVE"
find "$CACHE" -maxdepth 1 -name "$NAME-*.tar" ! -path "$ARCHIVE" -delete  # older contents
[ -n "$previous" ] && [ "$previous" != "$(id_of "$IMAGE")" ] && rmi_untagged "$previous"  # vfs: each is a full copy
finish
