#!/usr/bin/env bash
# Builds the gateway, controller and worker images and pushes each as `latest` and as the git
# SHA. Usage, from anywhere in the repository:
#   REGISTRY=<your registry>/llmctl images/build.sh          # build and push
#   REGISTRY=<your registry>/llmctl PUSH=0 images/build.sh   # build only
# ENGINE=podman uses podman instead of docker.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${REGISTRY:?set REGISTRY to the repository prefix to push to, e.g. <registry>/llmctl}"
ENGINE="${ENGINE:-docker}"
PUSH="${PUSH:-1}"
SHA="$(git rev-parse --short=12 HEAD)"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
if ! git diff --quiet HEAD; then
    SHA="${SHA}-dirty"
fi

for image in gateway controller worker; do
    echo "== ${REGISTRY}/${image}:${SHA} (version ${VERSION})"
    "$ENGINE" build -f "images/${image}.Dockerfile" \
        --build-arg VERSION="$VERSION" --build-arg GIT_SHA="$SHA" \
        -t "${REGISTRY}/${image}:${SHA}" -t "${REGISTRY}/${image}:latest" .
    if [ "$PUSH" = 1 ]; then
        "$ENGINE" push "${REGISTRY}/${image}:${SHA}"
        "$ENGINE" push "${REGISTRY}/${image}:latest"
    fi
done
echo "images: ${REGISTRY}/{gateway,controller,worker}:{${SHA},latest}"
