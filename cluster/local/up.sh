#!/usr/bin/env bash
# Start a local Ray head for polyclip (GCS, dashboard, job API) with token authentication.
#
#   cluster/local/up.sh                       # token auth, dashboard on 127.0.0.1:8265
#   POLYCLIP_DASHBOARD_PORT=8275 POLYCLIP_RAY_PORT=6390 cluster/local/up.sh
#   POLYCLIP_RAY_AUTH=disabled cluster/local/up.sh   # no auth (tests, `make demo`)
#
# Environment knobs (all optional):
#   POLYCLIP_RAY_PORT          GCS port                                  (6379)
#   POLYCLIP_DASHBOARD_PORT    dashboard + job API port                  (8265)
#   POLYCLIP_DASHBOARD_HOST    address the dashboard binds               (127.0.0.1)
#   POLYCLIP_NODE_IP           this node's IP for Ray                    (127.0.0.1)
#   POLYCLIP_NUM_CPUS          CPUs the head offers                      (all)
#   POLYCLIP_NUM_GPUS          GPUs the head offers                      (all)
#   POLYCLIP_OBJECT_STORE_MB   object store size in MiB                  (Ray's default)
#   POLYCLIP_RAY_AUTH          token | disabled                          (token)
#   POLYCLIP_RAY_AUTH_TOKEN_FILE  token file; created (0600) if missing  ($POLYCLIP_STATE_DIR/auth_token)
#   POLYCLIP_STATE_DIR         where the head's PID, env and log go      (<repo>/.ray-local)
#   POLYCLIP_RAY_TEMP_DIR      Ray's --temp-dir (sessions, logs, sockets) (/tmp/polyclip-ray-<uid>-<port>)
#   POLYCLIP_DASHBOARD_AGENT_PORT, POLYCLIP_RAY_CLIENT_PORT   (free ports, picked at start)
#   POLYCLIP_RAY_START_TIMEOUT seconds to wait for the job API           (180)
#   POLYCLIP_RAY_EXTRA_ARGS    more `ray start` flags (word-split)
#   POLYCLIP_RAY_BIN, POLYCLIP_PYTHON   the ray CLI / python to use      (.venv/bin first on PATH)
#
# Stop it with cluster/local/down.sh (never plain `ray stop`: that kills every Ray
# process on the machine, other people's clusters included).
set -euo pipefail
set +m  # no job control: the head must not be a process-group leader before setsid

# shellcheck source=cluster/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RAY_PORT="${POLYCLIP_RAY_PORT:-6379}"
DASHBOARD_PORT="${POLYCLIP_DASHBOARD_PORT:-8265}"
DASHBOARD_HOST="${POLYCLIP_DASHBOARD_HOST:-127.0.0.1}"
NODE_IP="${POLYCLIP_NODE_IP:-127.0.0.1}"
AUTH="${POLYCLIP_RAY_AUTH:-token}"
TOKEN_FILE="${POLYCLIP_RAY_AUTH_TOKEN_FILE:-$STATE_DIR/auth_token}"
TEMP_DIR="${POLYCLIP_RAY_TEMP_DIR:-${TMPDIR:-/tmp}/polyclip-ray-$(id -u)-$RAY_PORT}"
TIMEOUT="${POLYCLIP_RAY_START_TIMEOUT:-180}"
LOG_FILE="$STATE_DIR/head.log"

[[ -n "$RAY_BIN" && -x "$RAY_BIN" ]] || die "no 'ray' CLI found (create the venv: python -m venv .venv && .venv/bin/pip install -e .)"
[[ -n "$PY_BIN" ]] || die "no python found"
case "$AUTH" in
  token|disabled) ;;
  *) die "POLYCLIP_RAY_AUTH must be 'token' or 'disabled', not '$AUTH'" ;;
esac
# A dashboard reachable from the network without auth lets anyone submit jobs (run code): refused.
case "$DASHBOARD_HOST" in
  127.*|localhost|::1) ;;
  *) [[ "$AUTH" == token ]] || die "POLYCLIP_DASHBOARD_HOST=$DASHBOARD_HOST is not loopback and POLYCLIP_RAY_AUTH=disabled: anyone who reaches the dashboard could run code; keep auth on (POLYCLIP_RAY_AUTH=token) or bind 127.0.0.1" ;;
esac

mkdir -p "$STATE_DIR"
chmod 700 "$STATE_DIR"
# Ray's temp dir holds sockets and session files at a predictable path: create it ourselves,
# private, and refuse one that someone else created first (or that is a symlink).
if [[ -L "$TEMP_DIR" ]]; then
  die "Ray temp dir $TEMP_DIR is a symlink; refusing it (set POLYCLIP_RAY_TEMP_DIR to a private folder)"
fi
if [[ -e "$TEMP_DIR" ]]; then
  [[ -d "$TEMP_DIR" && "$(stat -c %u "$TEMP_DIR")" == "$(id -u)" ]] \
    || die "Ray temp dir $TEMP_DIR exists and is not a folder owned by you; refusing it (set POLYCLIP_RAY_TEMP_DIR)"
else
  (umask 077 && mkdir -p "$TEMP_DIR")
fi
chmod 700 "$TEMP_DIR"
# Keep the state (and the token) out of git without touching the repo's .gitignore.
[[ -f "$STATE_DIR/.gitignore" ]] || printf '*\n' > "$STATE_DIR/.gitignore"

# One head per state dir.
if [[ -f "$STATE_FILE" ]]; then
  # shellcheck disable=SC1090
  OLD_PID="$(. "$STATE_FILE"; echo "${HEAD_PID:-}")"
  if pid_alive "$OLD_PID"; then
    die "a head started from $STATE_DIR is already running (pid $OLD_PID); run cluster/local/down.sh first"
  fi
  log "removing stale state of a head that is gone (pid ${OLD_PID:-?})"
  rm -f "$STATE_FILE" "$CLIENT_ENV_FILE"
fi

# Refuse ports in use: otherwise the readiness probe could answer from someone else's cluster.
CLIENT_HOST="$DASHBOARD_HOST"
[[ "$CLIENT_HOST" == "0.0.0.0" || "$CLIENT_HOST" == "::" ]] && CLIENT_HOST=127.0.0.1
for hp in "$NODE_IP:$RAY_PORT" "$CLIENT_HOST:$DASHBOARD_PORT"; do
  if port_busy "${hp%:*}" "${hp##*:}"; then
    die "port ${hp##*:} is in use on ${hp%:*} (another Ray cluster?); pick others with POLYCLIP_RAY_PORT / POLYCLIP_DASHBOARD_PORT"
  fi
done
AGENT_PORT="${POLYCLIP_DASHBOARD_AGENT_PORT:-$(free_port)}"
CLIENT_PORT="${POLYCLIP_RAY_CLIENT_PORT:-$(free_port)}"

# Token authentication (Ray >= 2.52): the head and every process it starts read
# RAY_AUTH_MODE=token and the token from RAY_AUTH_TOKEN_PATH; clients send it as
# "Authorization: Bearer <token>".
HEAD_ENV=(RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1)
if [[ "$AUTH" == token ]]; then
  if [[ ! -s "$TOKEN_FILE" ]]; then
    mkdir -p "$(dirname "$TOKEN_FILE")"
    (umask 077 && "$PY_BIN" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$TOKEN_FILE")
    log "generated a new auth token in $TOKEN_FILE"
  fi
  chmod 600 "$TOKEN_FILE"
  TOKEN_FILE="$(cd "$(dirname "$TOKEN_FILE")" && pwd)/$(basename "$TOKEN_FILE")"
  HEAD_ENV+=(RAY_AUTH_MODE=token "RAY_AUTH_TOKEN_PATH=$TOKEN_FILE")
  if [[ -n "${RAY_AUTH_TOKEN:-}" && "${RAY_AUTH_TOKEN}" != "$(cat "$TOKEN_FILE")" ]]; then
    log "warning: RAY_AUTH_TOKEN in this shell differs from $TOKEN_FILE; clients started here would send the wrong token"
  fi
else
  # Explicitly off: with the mode unset, Ray >= 2.59 turns auth on when ~/.ray/auth_token exists.
  HEAD_ENV+=(RAY_AUTH_MODE=disabled)
fi

CLUSTER_ID="polyclip-$(id -u)-$RAY_PORT-$$-$(date +%s)"
HEAD_ENV+=("POLYCLIP_RAY_CLUSTER_ID=$CLUSTER_ID")

ARGS=(start --head --block
  --port "$RAY_PORT"
  --node-ip-address "$NODE_IP"
  --dashboard-host "$DASHBOARD_HOST"
  --dashboard-port "$DASHBOARD_PORT"
  --dashboard-agent-listen-port "$AGENT_PORT"
  --ray-client-server-port "$CLIENT_PORT"
  --temp-dir "$TEMP_DIR"
  --disable-usage-stats)
[[ -n "${POLYCLIP_NUM_CPUS:-}" ]] && ARGS+=(--num-cpus "$POLYCLIP_NUM_CPUS")
[[ -n "${POLYCLIP_NUM_GPUS:-}" ]] && ARGS+=(--num-gpus "$POLYCLIP_NUM_GPUS")
[[ -n "${POLYCLIP_OBJECT_STORE_MB:-}" ]] && ARGS+=(--object-store-memory "$((POLYCLIP_OBJECT_STORE_MB * 1024 * 1024))")
if [[ -n "${POLYCLIP_RAY_EXTRA_ARGS:-}" ]]; then
  # shellcheck disable=SC2206
  EXTRA=($POLYCLIP_RAY_EXTRA_ARGS)
  ARGS+=("${EXTRA[@]}")
fi

mkdir -p "$TEMP_DIR"
log "starting Ray head: $RAY_BIN ${ARGS[*]}"
# A new session (setsid) gives the head its own process group, and `--block` keeps
# one parent process that shuts all of them down on SIGTERM.
env -u RAY_AUTH_TOKEN -u RAY_ADDRESS "${HEAD_ENV[@]}" \
  nohup "$PY_BIN" -c 'import os, sys
try:
    os.setsid()
except OSError:
    pass
os.execvp(sys.argv[1], sys.argv[1:])' \
  "$RAY_BIN" "${ARGS[@]}" > "$LOG_FILE" 2>&1 < /dev/null &
HEAD_PID=$!

DASHBOARD_URL="http://$CLIENT_HOST:$DASHBOARD_PORT"
GCS_ADDRESS="$NODE_IP:$RAY_PORT"
{
  echo "# Written by cluster/local/up.sh; read by cluster/local/down.sh."
  printf 'HEAD_PID=%q\n' "$HEAD_PID"
  printf 'HEAD_PGID=%q\n' "$HEAD_PID"  # its own process group after setsid (down.sh checks)
  printf 'CLUSTER_ID=%q\n' "$CLUSTER_ID"
  printf 'TEMP_DIR=%q\n' "$TEMP_DIR"
  printf 'RAY_PORT=%q\n' "$RAY_PORT"
  printf 'DASHBOARD_PORT=%q\n' "$DASHBOARD_PORT"
  printf 'DASHBOARD_URL=%q\n' "$DASHBOARD_URL"
  printf 'GCS_ADDRESS=%q\n' "$GCS_ADDRESS"
  printf 'AUTH_MODE=%q\n' "$AUTH"
  printf 'TOKEN_FILE=%q\n' "$([[ "$AUTH" == token ]] && echo "$TOKEN_FILE")"
  printf 'LOG_FILE=%q\n' "$LOG_FILE"
} > "$STATE_FILE"

# Wait until the job API answers (with the token when auth is on).
probe_jobs_api() {
  "$PY_BIN" - "$DASHBOARD_URL" "$([[ "$AUTH" == token ]] && echo "$TOKEN_FILE")" <<'PYEOF'
import sys, urllib.request
url, token_file = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url + "/api/jobs/")
if token_file:
    req.add_header("Authorization", "Bearer " + open(token_file).read().strip())
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PYEOF
}

deadline=$((SECONDS + TIMEOUT))
until probe_jobs_api; do
  if ! pid_alive "$HEAD_PID"; then
    tail -n 30 "$LOG_FILE" >&2 || true
    rm -f "$STATE_FILE"
    die "the Ray head exited during start-up (log: $LOG_FILE)"
  fi
  if (( SECONDS >= deadline )); then
    tail -n 30 "$LOG_FILE" >&2 || true
    log "the job API did not answer within ${TIMEOUT}s; stopping the head"
    "$(dirname "${BASH_SOURCE[0]}")/down.sh" >&2 || true
    exit 1
  fi
  sleep 1
done

# A file clients can source: `source .ray-local/env.sh && ray job submit ...`.
{
  echo "# Client settings for the local polyclip Ray head (written by cluster/local/up.sh)."
  printf 'export RAY_API_SERVER_ADDRESS=%q\n' "$DASHBOARD_URL"
  if [[ "$AUTH" == token ]]; then
    echo "export RAY_AUTH_MODE=token"
    printf 'export RAY_AUTH_TOKEN_PATH=%q\n' "$TOKEN_FILE"
    echo "unset RAY_AUTH_TOKEN"
  fi
} > "$CLIENT_ENV_FILE"

cat <<MSG
Ray head is up (pid $HEAD_PID, auth: $AUTH).
  dashboard / job API : $DASHBOARD_URL
  GCS address         : $GCS_ADDRESS
  logs                : $LOG_FILE and $TEMP_DIR/session_latest/logs
Submit a job from the repo root:
MSG
if [[ "$AUTH" == token ]]; then
  cat <<MSG
  RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN_FILE \\
    ray job submit --address $DASHBOARD_URL --runtime-env cluster/runtime_env.yaml \\
    -- python -m jobs.train --config jobs/configs/smoke_probe.yaml
  (or: source $CLIENT_ENV_FILE && ray job submit --runtime-env cluster/runtime_env.yaml -- python -m jobs.train --config ...)
  Python: JobSubmissionClient("$DASHBOARD_URL", headers={"Authorization": "Bearer " + open("$TOKEN_FILE").read().strip()})
  Browser: the dashboard asks for the token once (cat $TOKEN_FILE).
MSG
else
  cat <<MSG
  ray job submit --address $DASHBOARD_URL --runtime-env cluster/runtime_env.yaml \\
    -- python -m jobs.train --config jobs/configs/smoke_probe.yaml
MSG
fi
echo "Stop it with: cluster/local/down.sh$([[ -n "${POLYCLIP_STATE_DIR:-}" ]] && echo " (with POLYCLIP_STATE_DIR=$STATE_DIR)")"
