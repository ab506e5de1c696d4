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
    -- python -m jobs.train --config "$CONFIG" "run.output_dir=$PWD/runs" "run.feature_store=$PWD/.cache/features"

echo
echo "== results (runs/$NAME/report.md)"
sed -n '1,/## Per-class/p' "runs/$NAME/report.md" | head -n -1
echo "== train job done after $(( $(date +%s) - START )) s; run directory: runs/$NAME"

# Second half: fit the adaptive ensemble of the three EfficientNet-Lite backbones (reusing the
# lite0 features just cached), then serve it and classify real photos and test images over HTTP.
ENSEMBLE_CONFIG="${ENSEMBLE_CONFIG:-jobs/configs/ensemble/demo.yaml}"
ENAME=$("$PY" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$ENSEMBLE_CONFIG")
echo
echo "== submitting the ensemble job $ENSEMBLE_CONFIG (run $ENAME)"
ray job submit --address "$ADDRESS" --working-dir . --runtime-env cluster/runtime_env.yaml \
    -- python -m jobs.ensemble --config "$ENSEMBLE_CONFIG" "run.output_dir=$PWD/runs" "run.feature_store=$PWD/.cache/features"
echo
echo "== ensemble results (runs/$ENAME/ensemble.md)"
sed -n '1,/^Mean backbone weight/p' "runs/$ENAME/ensemble.md" | head -n -1

echo "== serving runs/$ENAME/ensemble on Ray Serve and classifying over HTTP"
ray job submit --address "$ADDRESS" --working-dir . --runtime-env cluster/runtime_env.yaml \
    -- python -m serve.demo_client --artifact "$PWD/runs/$ENAME/ensemble"
echo "== finished in $(( $(date +%s) - START )) s; runs: runs/$NAME, runs/$ENAME (artifact runs/$ENAME/ensemble)"
