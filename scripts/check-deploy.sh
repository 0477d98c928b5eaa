#!/usr/bin/env bash
# The deployment checks of `make test` (issue 8, OPS-1/OPS-3): helm lint, the
# chart rendered with default and production-like values and validated against
# the Kubernetes 1.30 and 1.33 schemas, per-service probes/resources/PDB/HPA,
# NetworkPolicies, kustomize base == chart, documented variables and alerts.
# Installs helm, kubectl and kubernetes-validate first if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deploy-tools.sh
exec "$PYTHON" scripts/check_deploy.py
