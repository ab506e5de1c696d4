# Shared by cluster/local/up.sh and cluster/local/down.sh (sourced, not run).
# Resolves the project root, the Ray CLI / Python to use, and the state directory.

POLYCLIP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# The venv's tools first: `ray` of the pinned version, and `python` for the jobs
# that the head starts (a job's entrypoint `python ...` runs with the head's PATH).
if [[ -x "$POLYCLIP_ROOT/.venv/bin/ray" ]]; then
  PATH="$POLYCLIP_ROOT/.venv/bin:$PATH"
  export PATH
fi
RAY_BIN="${POLYCLIP_RAY_BIN:-$(command -v ray || true)}"
PY_BIN="${POLYCLIP_PYTHON:-$(command -v python || command -v python3 || true)}"

STATE_DIR="${POLYCLIP_STATE_DIR:-$POLYCLIP_ROOT/.ray-local}"
STATE_FILE="$STATE_DIR/head.env"
CLIENT_ENV_FILE="$STATE_DIR/env.sh"

log() { printf '[polyclip-cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# True when PID is a live process (not a zombie).
pid_alive() {
  local pid="$1" stat
  [[ -n "$pid" ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  stat="$(ps -o stat= -p "$pid" 2>/dev/null || true)"
  [[ -n "$stat" && "$stat" != Z* ]]
}

# PIDs of every process that belongs to one head started by up.sh: the ones that
# carry its marker in their environment (Linux: /proc/*/environ; inherited by the
# GCS, raylet, dashboard, workers and job drivers, which Ray starts in their own
# sessions) plus the members of the head's process group.
cluster_pids() {
  local cluster_id="$1" pgid="$2" d pid
  {
    if [[ -n "$cluster_id" && -d /proc ]]; then
      for d in /proc/[0-9]*; do
        pid="${d#/proc/}"
        [[ "$pid" == "$$" || "$pid" == "$BASHPID" ]] && continue
        if grep -qzxF "POLYCLIP_RAY_CLUSTER_ID=$cluster_id" "$d/environ" 2>/dev/null; then
          echo "$pid"
        fi
      done
    fi
    if [[ -n "$pgid" ]]; then
      ps -eo pid=,pgid= 2>/dev/null | awk -v g="$pgid" '$2 == g { print $1 }'
    fi
  } | sort -un | while read -r pid; do
    [[ "$pid" == "$$" ]] && continue
    pid_alive "$pid" && echo "$pid"
  done
  return 0
}

# True when something accepts TCP connections on HOST:PORT.
port_busy() {
  "$PY_BIN" - "$1" "$2" <<'PYEOF'
import socket, sys
s = socket.socket()
s.settimeout(1.0)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
except OSError:
    sys.exit(1)
finally:
    s.close()
sys.exit(0)
PYEOF
}

# A TCP port that is free now (from the kernel's ephemeral range, which lies outside
# Ray's default worker port range 10002-19999).
free_port() {
  "$PY_BIN" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
