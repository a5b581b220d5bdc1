#!/usr/bin/env bash
# Sets everything up on a fresh machine, builds the site and serves it on localhost.
#   scripts/serve.sh [PORT]     (default 8080)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-site.sh
exec python3 scripts/serve.py dist "${1:-8080}"
