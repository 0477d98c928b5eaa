#!/usr/bin/env bash
# Loads the generated demo data set into the running services (make run).
# Safe to repeat: records match or deduplicate instead of doubling.
set -euo pipefail
cd "$(dirname "$0")/.."
export JWT_SECRET_FILE=${JWT_SECRET_FILE:-$PWD/.local/jwt-secret}
if [[ -x target/local/crm-demo ]] && (exec 3<>/dev/tcp/127.0.0.1/50051) 2>/dev/null; then
  ./target/local/crm-demo seed --customers "${DEMO_CUSTOMERS:-2000}"
fi
