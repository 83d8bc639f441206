#!/usr/bin/env bash
# README's run command from nothing, as a new user meets it: set-up without the test extras in a
# venv of its own, `serve-app run` (as make run: serve run config/serve.yaml, HAProxy in front),
# /health 200, one chat request, then stop.
#   scripts/smoke_run.sh     env: VENV (.venv-run), HEALTH_TIMEOUT_S (300), SMOKE_LOG
# Exits nonzero, with the server log's tail, if any step fails. Stops only what it started.
set -euo pipefail
cd "$(dirname "$0")/.."

export VENV=${VENV:-.venv-run}
CONFIG=config/serve.yaml
CHAT_MODEL=smollm2-135m-instruct
HEALTH_TIMEOUT_S=${HEALTH_TIMEOUT_S:-300}
LOG=${SMOKE_LOG:-test-output/smoke_run.log}
started_at=$SECONDS
server_pid=""

say() { echo "== smoke [$((SECONDS - started_at))s] $*"; }
fail() {
  echo "smoke run FAILED: $*" >&2
  if [ -f "$LOG" ]; then
    echo "-- first errors in $LOG:" >&2
    grep -a -m 20 -E "Error|ERROR|Traceback" "$LOG" | cut -c1-400 >&2 || true
    echo "-- last lines of $LOG:" >&2
    tail -n 15 "$LOG" | cut -c1-400 >&2
  fi
  exit 1
}

# The members of the server's session (it is the leader): `serve run` and the Ray it started.
session_members() { ps -e -o pid=,sid= | awk -v sid="$1" '$2 == sid && $1 != sid { print $1 }'; }

stop_server() {
  [ -n "$server_pid" ] || return 0
  local pid=$server_pid
  server_pid=""
  if kill -0 "$pid" 2>/dev/null; then
    say "stopping serve run (pid $pid) with SIGINT"
    kill -INT "$pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  fi
  if kill -0 "$pid" 2>/dev/null; then
    say "serve run still up after 60s: killing its process group"
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  local left
  left=$(session_members "$pid")
  if [ -n "$left" ]; then
    say "killing what serve run left behind: $(echo "$left" | tr '\n' ' ')"
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null || true
  fi
}
trap stop_server EXIT
trap 'exit 130' INT TERM

say "set-up in $VENV (run dependencies only)"
scripts/setup.sh
if "$VENV/bin/python" -c "import pytest" 2>/dev/null; then
  say "note: $VENV has pytest, so it is not a run-only environment"
fi

address=$("$VENV/bin/python" -c '
import sys, yaml
http = yaml.safe_load(open(sys.argv[1]))["http_options"]
print(http["host"], http["port"])' "$CONFIG") || fail "no http_options host and port in $CONFIG"
read -r host port <<<"$address"
url="http://$host:$port"
if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
  fail "$host:$port (from $CONFIG) is already taken by another process; free it first"
fi

mkdir -p "$(dirname "$LOG")"
say "serve run $CONFIG (log: $LOG)"
# A session of its own, so its pid is its process group and stopping it touches nothing else.
# Bash starts background jobs with SIGINT ignored, and Python then never turns SIGINT into
# KeyboardInterrupt: the launcher puts SIGINT back to default before it execs `serve run`.
env -u RAY_ADDRESS "$VENV/bin/python" -c '
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.setsid()
os.execv(sys.argv[1], sys.argv[1:])' "$VENV/bin/serve-app" run --config "$CONFIG" >"$LOG" 2>&1 &
server_pid=$!

deadline=$((SECONDS + HEALTH_TIMEOUT_S))
until [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$url/health")" = 200 ]; do
  kill -0 "$server_pid" 2>/dev/null || fail "serve run exited before /health answered 200"
  [ "$SECONDS" -lt "$deadline" ] || fail "/health not 200 after ${HEALTH_TIMEOUT_S}s"
  sleep 2
done
say "/health 200"

auth=()
[ -n "${SERVE_APP_API_KEY:-}" ] && auth=(-H "Authorization: Bearer $SERVE_APP_API_KEY")
body='{"model": "'$CHAT_MODEL'", "max_tokens": 8, "temperature": 0,
       "messages": [{"role": "user", "content": "What is the capital of France?"}]}'
reply=$(curl -s --max-time 120 -w '\n%{http_code}' "${auth[@]}" \
  -H 'content-type: application/json' -d "$body" "$url/v1/chat/completions") \
  || fail "the chat request got no answer"
status=${reply##*$'\n'}
reply=${reply%$'\n'*}
[ "$status" = 200 ] || fail "chat answered HTTP $status: $reply"
content=$("$VENV/bin/python" -c '
import json, sys
print(json.loads(sys.argv[1])["choices"][0]["message"]["content"] or "")' "$reply") \
  || fail "chat's 200 is not a chat completion: $reply"
[ -n "$content" ] || fail "chat answered 200 with empty content: $reply"
say "chat 200: ${content//$'\n'/ }"

stop_server
say "passed"
