#!/usr/bin/env bash
# A stand-in for python:3.11-slim-bookworm, for machines that can reach Debian's package mirror but
# no container registry: Debian bookworm (minbase) with its Python 3.11, imported into the Docker
# daemon named by DOCKER_HOST. docker/build.sh builds the images FROM it there.
#
#   docker/stand-in-base.sh [TAG]        (default leoclr-stand-in-base:bookworm)
#
# The tag is a plain name: `FROM localhost/...` would be read as a registry to pull from.
# An image already present under TAG is reused. Needs root (debootstrap) and debootstrap itself
# (apt-get install debootstrap). The mirror is the one apt uses on this machine unless
# DEBIAN_MIRROR names another.
set -euo pipefail

TAG=${1:-leoclr-stand-in-base:bookworm}

if docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "stand-in base $TAG: already in the daemon"
    exit 0
fi

command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }

# The first Debian archive (not the security one) of apt's own sources, deb822 or one-line format.
mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        grep -h -o -E '(^URIs:[[:space:]]*|^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?)[a-z]+://[^[:space:]]+' "$f" \
            | grep -o -E '[a-z]+://[^[:space:]]+' | grep -E '/debian/?$' | grep -v security || true
    done | head -n 1
}
MIRROR=${DEBIAN_MIRROR:-$(mirror)}
[ -n "$MIRROR" ] || { echo "no Debian mirror found in /etc/apt/sources.list*: set DEBIAN_MIRROR" >&2; exit 1; }

ROOTFS=$(mktemp -d "${TMPDIR:-/tmp}/leoclr-rootfs.XXXXXX")
trap 'rm -rf "$ROOTFS"' EXIT

# python-is-python3: `python` resolves, as in the python:3.11 images the Dockerfiles are written for.
# ca-certificates: TLS to package indexes and object stores.
echo "stand-in base $TAG: debootstrap bookworm from $MIRROR"
debootstrap --variant=minbase \
    --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 \
    || { tail -n 30 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*

tar --numeric-owner -C "$ROOTFS" -c . \
    | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$TAG" >/dev/null
echo "stand-in base $TAG: imported"
