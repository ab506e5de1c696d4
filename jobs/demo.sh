#!/usr/bin/env bash
# `make demo`: start a local Ray head, submit the demo job with `ray job submit`, print
# the results table, (when the ensemble is available) fit and serve it and classify a
# few real photos over HTTP, then stop the head this script started.
#
#   jobs/demo.sh [jobs/configs/demo.yaml]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-jobs/configs/demo.yaml}"
PY="${PY:-.venv/bin/python}"
export RAY_USAGE_STATS_ENABLED=0
export POLYCLIP_DASHBOARD_PORT="${POLYCLIP_DASHBOARD_PORT:-8265}"
ADDRESS="http://127.0.0.1:${POLYCLIP_DASHBOARD_PORT}"
START=$(date +%s)

cluster/local/up.sh
trap 'cluster/local/down.sh || true' EXIT
# Client settings for the token-authenticated head (RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH).
# shellcheck disable=SC1091
source .ray-local/env.sh

NAME=$("$PY" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$CONFIG")
echo "== submitting $CONFIG (run $NAME) to $ADDRESS"
# The job runs in an unpacked copy of the working dir: point outputs and the feature
# cache at this checkout so the results (and the cache) outlive the job.
ray job submit --address "$ADDRESS" --working-dir . --runtime-env cluster/runtime_env.yaml \
    -- python -m jobs.train --config "$CONFIG" "run.output_dir=$PWD/runs" "run.cache_dir=$PWD/.cache/features"

echo
echo "== results (runs/$NAME/report.md)"
sed -n '1,/## Per-class/p' "runs/$NAME/report.md" | head -n -1
echo "== finished in $(( $(date +%s) - START )) s; run directory: runs/$NAME"
