#!/usr/bin/env bash
# Stop ONLY the Ray head that cluster/local/up.sh started (the one recorded in
# $POLYCLIP_STATE_DIR/head.env), never anyone else's: no `ray stop`, which kills
# every Ray process on the machine.
#
# 1. SIGTERM to the `ray start --block` process: Ray shuts down its GCS, raylet,
#    dashboard and workers itself.
# 2. Whatever is left of this head (processes carrying its POLYCLIP_RAY_CLUSTER_ID
#    marker in their environment, e.g. job drivers Ray starts in their own
#    sessions, or members of its process group) gets SIGTERM, then SIGKILL.
#
# Knobs: POLYCLIP_STATE_DIR (<repo>/.ray-local), POLYCLIP_STOP_TIMEOUT (20 s of
# grace before SIGKILL). The token file and Ray's temp dir (logs) are kept.
set -euo pipefail

# shellcheck source=cluster/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

GRACE="${POLYCLIP_STOP_TIMEOUT:-20}"

if [[ ! -f "$STATE_FILE" ]]; then
  log "no head recorded in $STATE_DIR (nothing to stop)"
  exit 0
fi
HEAD_PID="" HEAD_PGID="" CLUSTER_ID="" TEMP_DIR="" DASHBOARD_URL=""
# shellcheck disable=SC1090
source "$STATE_FILE"
[[ -n "$CLUSTER_ID" ]] || die "$STATE_FILE has no CLUSTER_ID; refusing to guess which processes to stop"

# Use the process group only if it is still the head's own (setsid made it leader).
PGID=""
if pid_alive "$HEAD_PID"; then
  cur_pgid="$(ps -o pgid= -p "$HEAD_PID" 2>/dev/null | tr -d ' ' || true)"
  [[ "$cur_pgid" == "$HEAD_PID" && "$HEAD_PGID" == "$HEAD_PID" ]] && PGID="$HEAD_PID"
else
  # The head is gone: its group may linger under the same id, but only trust the
  # environment marker (a reused pgid could belong to someone else).
  PGID=""
fi

# Is HEAD_PID still our head (and not a reused PID)? Check its environment marker.
is_our_head() {
  [[ -d /proc ]] || { ps -o command= -p "$HEAD_PID" 2>/dev/null | grep -q "ray start"; return; }
  grep -qzxF "POLYCLIP_RAY_CLUSTER_ID=$CLUSTER_ID" "/proc/$HEAD_PID/environ" 2>/dev/null
}

wait_gone() {  # wait_gone SECONDS -> 0 when no process of this head is left
  local until=$((SECONDS + $1))
  while (( SECONDS < until )); do
    [[ -z "$(cluster_pids "$CLUSTER_ID" "$PGID")" ]] && return 0
    sleep 1
  done
  [[ -z "$(cluster_pids "$CLUSTER_ID" "$PGID")" ]]
}

if pid_alive "$HEAD_PID" && is_our_head; then
  log "stopping Ray head pid $HEAD_PID ($CLUSTER_ID)"
  kill -TERM "$HEAD_PID" 2>/dev/null || true
else
  log "head pid ${HEAD_PID:-?} is not running; cleaning up what is left of $CLUSTER_ID"
fi

if ! wait_gone "$GRACE"; then
  left="$(cluster_pids "$CLUSTER_ID" "$PGID" | tr '\n' ' ')"
  log "still running after ${GRACE}s: $left- sending SIGTERM"
  # shellcheck disable=SC2086
  kill -TERM $left 2>/dev/null || true
  if ! wait_gone 5; then
    left="$(cluster_pids "$CLUSTER_ID" "$PGID" | tr '\n' ' ')"
    log "sending SIGKILL to: $left"
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null || true
    wait_gone 5 || die "could not stop: $(cluster_pids "$CLUSTER_ID" "$PGID" | tr '\n' ' ')"
  fi
fi

rm -f "$STATE_FILE" "$CLIENT_ENV_FILE"
log "Ray head stopped (logs kept in ${TEMP_DIR:-?})"
