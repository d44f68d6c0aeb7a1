#!/usr/bin/env bash
# One hash of the package's sources (every file under sidecar/ but bytecode), as
# scripts/build-native.sh records it: a compiled copy is current when the two agree.
set -euo pipefail
cd "$(dirname "$0")/.."
find sidecar -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 \
    | LC_ALL=C sort -z \
    | xargs -0 sha256sum \
    | sha256sum \
    | cut -d' ' -f1
