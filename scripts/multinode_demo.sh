#!/usr/bin/env bash
# From one machine to a cluster: a real two-node Ray cluster on this machine (two raylets),
# the app deployed with `serve deploy`, one model pinned to the second node.
#
#   scripts/multinode_demo.sh            up, deploy, check, down (cleans up on any exit)
#   scripts/multinode_demo.sh up|deploy|check|down   one step; state in $MULTINODE_DIR
#
# Everything lives in $MULTINODE_DIR (default: a new /tmp/serve-app-mn.XXXX): the Ray temp dir,
# logs, pids, ports, the deployed config. Only the processes started here are ever stopped: each
# node's `ray start --block` by its recorded pid, then whatever is left in the session `setsid`
# gave it. (`ray stop` would stop every Ray instance on the machine, other people's included.)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=${VENV:-$REPO/.venv}
PY=$VENV/bin/python
RAY=$VENV/bin/ray
SERVE=$VENV/bin/serve

# Ray turns 127.0.0.1 / localhost as a node address into this machine's routable IP; another
# loopback address keeps node-to-node traffic on the loopback interface.
NODE_IP=${NODE_IP:-127.0.0.2}
# The model pinned to the second node, and the one kept on the head, from config/serve.yaml.
WORKER_MODEL=${WORKER_MODEL:-smollm2-135m-instruct}
HEAD_MODEL=${HEAD_MODEL:-all-minilm-l6-v2}
STEP_TIMEOUT_S=${STEP_TIMEOUT_S:-180}
# How long a node's SIGTERM waits for its work to drain (Ray's default: 30 s).
DRAIN_TIMEOUT_S=${DRAIN_TIMEOUT_S:-5}

state_dir() {
  if [ -z "${MULTINODE_DIR:-}" ]; then
    MULTINODE_DIR=$(mktemp -d /tmp/serve-app-mn.XXXX)
  fi
  mkdir -p "$MULTINODE_DIR"
  export MULTINODE_DIR
}

load_state() {
  [ -f "$MULTINODE_DIR/cluster.env" ] || { echo "no cluster in $MULTINODE_DIR" >&2; exit 1; }
  set -a # export all: the Ray and Serve CLIs and the Python snippets read them
  # shellcheck disable=SC1091
  source "$MULTINODE_DIR/cluster.env"
  set +a
}

free_ports() {
  "$PY" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# `ray start --block` in a session of its own: it and everything it spawns are ours alone.
start_node() {
  local name=$1
  shift
  RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=$DRAIN_TIMEOUT_S setsid "$RAY" start --block \
    --disable-usage-stats --node-ip-address="$NODE_IP" --temp-dir="$MULTINODE_DIR/ray" --min-worker-port=0 --max-worker-port=0 \
    --object-store-memory=$((256 * 1024 * 1024)) "$@" >"$MULTINODE_DIR/$name.log" 2>&1 &
  echo $! >"$MULTINODE_DIR/$name.pid"
}

wait_for_nodes() {
  local count=$1 deadline=$((SECONDS + STEP_TIMEOUT_S))
  until [ "$(node_count)" = "$count" ]; do
    for name in head worker; do
      if [ -f "$MULTINODE_DIR/$name.pid" ] && ! kill -0 "$(cat "$MULTINODE_DIR/$name.pid")" 2>/dev/null; then
        echo "the $name node exited; see $MULTINODE_DIR/$name.log" >&2
        tail -20 "$MULTINODE_DIR/$name.log" >&2
        exit 1
      fi
    done
    [ $SECONDS -lt $deadline ] || { echo "timed out waiting for $count nodes" >&2; exit 1; }
    sleep 1
  done
}

node_count() {
  "$RAY" list nodes --address "$DASHBOARD_URL" --filter "state=ALIVE" --format json 2>/dev/null \
    | "$PY" -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo 0
}

cmd_up() {
  state_dir
  local gcs dashboard head_agent client worker_agent http
  read -r gcs dashboard head_agent client worker_agent http <<<"$(free_ports 6)"
  # Token authentication, with a token of this cluster's own in the environment of every
  # process here (never written to ~/.ray/auth_token, which other Ray instances read): the GCS
  # and raylets listen on every interface, and the token keeps anyone else out.
  cat >"$MULTINODE_DIR/cluster.env" <<EOF
RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$("$PY" -c 'import secrets; print(secrets.token_hex(32))')
GCS_ADDRESS=$NODE_IP:$gcs
DASHBOARD_URL=http://127.0.0.1:$dashboard
HTTP_URL=http://127.0.0.1:$http
HTTP_PORT=$http
EOF
  chmod 600 "$MULTINODE_DIR/cluster.env"
  load_state
  echo "== head node (1 CPU, resource head_node) on $GCS_ADDRESS; state in $MULTINODE_DIR"
  start_node head --head --port="$gcs" --num-cpus=1 --resources='{"head_node": 1}' \
    --dashboard-host=127.0.0.1 --dashboard-port="$dashboard" \
    --dashboard-agent-listen-port="$head_agent" --ray-client-server-port="$client"
  wait_for_nodes 1
  echo "== second node (1 CPU, resource worker_node), a separate raylet joining $GCS_ADDRESS"
  start_node worker --address="$GCS_ADDRESS" --num-cpus=1 --resources='{"worker_node": 1}' \
    --dashboard-agent-listen-port="$worker_agent"
  wait_for_nodes 2
  show_nodes
}

show_nodes() {
  "$RAY" list nodes --address "$DASHBOARD_URL" --format json | "$PY" -c "$(cat <<'EOF'
import json, sys

for node in json.load(sys.stdin):
    resources = node["resources_total"]
    role = [r for r in resources if r in ("head_node", "worker_node")]
    print(f"   node {node['node_id'][:12]} {node['node_ip']} {node['state']} CPU={resources['CPU']} {role}")
EOF
)"
}

# config/serve.yaml, two models, one pinned to each node by a custom resource.
write_config() {
  "$PY" - "$MULTINODE_DIR/serve.yaml" <<EOF
import sys
import yaml

from serve_app.config import ingress_deployment, model_entries, with_models

pins = {"$WORKER_MODEL": "worker_node", "$HEAD_MODEL": "head_node"}
config = with_models(yaml.safe_load(open("config/serve.yaml")), set(pins))
config["proxy_location"] = "HeadOnly"  # both nodes share one machine, so one port
config["http_options"] = {"host": "127.0.0.1", "port": $HTTP_PORT}
for model_id, model in model_entries(config).items():
    options = model["deployment"]["ray_actor_options"]
    options["resources"] = {pins[model_id]: 0.01}
    model["engine"]["torch_threads"] = 1
    if model["kind"] != "embedding":  # an embedding model has no batch of sequences
        model["engine"]["max_num_seqs"] = min(4, model["engine"].get("max_num_seqs", 4))
ingress_deployment(config)["ray_actor_options"]["resources"] = {"head_node": 0.01}
yaml.safe_dump(config, open(sys.argv[1], "w"), sort_keys=False)
EOF
}

cmd_deploy() {
  state_dir
  load_state
  write_config
  echo "== serve deploy $MULTINODE_DIR/serve.yaml ($WORKER_MODEL -> worker_node, $HEAD_MODEL -> head_node)"
  "$SERVE" deploy "$MULTINODE_DIR/serve.yaml" --address "$DASHBOARD_URL"
  local deadline=$((SECONDS + STEP_TIMEOUT_S)) status=""
  while [ $SECONDS -lt $deadline ]; do
    # One application per model plus the ingress's: RUNNING once every one of them is.
    status=$("$SERVE" status --address "$DASHBOARD_URL" 2>/dev/null | "$PY" -c "$(cat <<'EOF'
import sys, yaml

apps = (yaml.safe_load(sys.stdin) or {}).get("applications") or {}
states = {app.get("status", "") for app in apps.values()}
failed = states & {"DEPLOY_FAILED", "UNHEALTHY"}
print(failed.pop() if failed else "RUNNING" if apps and states == {"RUNNING"} else "DEPLOYING")
EOF
)" || true)
    case "$status" in
      RUNNING) break ;;
      DEPLOY_FAILED | UNHEALTHY) "$SERVE" status --address "$DASHBOARD_URL" >&2; exit 1 ;;
    esac
    sleep 2
  done
  [ "$status" = RUNNING ] || { echo "apps not RUNNING after ${STEP_TIMEOUT_S}s ($status)" >&2; exit 1; }
  until curl -fsS "$HTTP_URL/health" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "$HTTP_URL/health never answered 200" >&2; exit 1; }
    sleep 1
  done
  echo "== serving on $HTTP_URL"
}

cmd_check() {
  state_dir
  load_state
  echo "== chat through the head's proxy to the replica on the second node"
  curl -fsS "$HTTP_URL/v1/chat/completions" -H 'content-type: application/json' -d '{
    "model": "'"$WORKER_MODEL"'", "temperature": 0, "max_tokens": 16,
    "messages": [{"role": "user", "content": "What is the capital of France?"}]}'
  echo
  echo "== embeddings from the replica on the head"
  curl -fsS "$HTTP_URL/v1/embeddings" -H 'content-type: application/json' \
    -d '{"model": "'"$HEAD_MODEL"'", "input": "hello"}' | head -c 120
  echo
  echo "== where each replica runs (Serve's REST API, as KubeRay reads it)"
  "$PY" - <<'EOF'
import os
import httpx

headers = {"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"}
base = os.environ["DASHBOARD_URL"]
nodes = httpx.get(f"{base}/api/v0/nodes", params={"detail": 1}, headers=headers).json()
roles = {
    n["node_id"]: next(r for r in ("head_node", "worker_node") if r in n["resources_total"])
    for n in nodes["data"]["result"]["result"]
    if n["state"] == "ALIVE"
}
apps = httpx.get(f"{base}/api/serve/applications/", headers=headers).json()["applications"]
for app_name, app in apps.items():
    for name, deployment in app["deployments"].items():
        for replica in deployment["replicas"]:
            where = f"node {replica['node_id'][:12]} ({roles[replica['node_id']]})"
            print(f"  {app_name:24} {name:24} {replica['state']:8} {where}")
EOF
}

# Every process still in the session that `setsid` gave a node: Ray's workers change their
# process group and title, but keep the session.
session_pids() {
  ps -eo pid=,sid=,stat= | awk -v sid="$1" -v self="$$" '$2 == sid && $1 != self && $3 !~ /^Z/ {print $1}'
}

cmd_down() {
  [ -n "${MULTINODE_DIR:-}" ] && [ -d "$MULTINODE_DIR" ] || { echo "nothing to stop" >&2; return 0; }
  echo "== stopping what was started in $MULTINODE_DIR"
  if [ -f "$MULTINODE_DIR/cluster.env" ] && [ -f "$MULTINODE_DIR/head.pid" ]; then
    load_state
    timeout 30 "$SERVE" shutdown --yes --address "$DASHBOARD_URL" >/dev/null 2>&1 || true
  fi
  local name file pid leftovers
  for name in worker head; do
    file=$MULTINODE_DIR/$name.pid
    [ -f "$file" ] || continue
    pid=$(cat "$file")
    # SIGTERM: `ray start --block` drains the node, then stops the processes it started.
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq $((DRAIN_TIMEOUT_S * 2 + 30))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    leftovers=$(session_pids "$pid")
    if [ -n "$leftovers" ]; then
      # shellcheck disable=SC2086
      echo "   $name: killing what is left:" $(ps -o pid=,comm= -p "$(echo $leftovers | tr ' ' ,)")
      # shellcheck disable=SC2086
      kill -KILL $leftovers 2>/dev/null || true
    fi
    rm -f "$file"
  done
}

finish() {
  local status=$?
  cmd_down
  if [ "$status" = 0 ]; then
    rm -rf "$MULTINODE_DIR"
  else
    echo "failed; logs kept in $MULTINODE_DIR (head.log, worker.log, ray/session_latest/logs)" >&2
  fi
}

case "${1:-all}" in
  up) cmd_up ;;
  deploy) cmd_deploy ;;
  check) cmd_check ;;
  down) cmd_down ;;
  all)
    state_dir
    trap finish EXIT
    cmd_up
    cmd_deploy
    cmd_check
    ;;
  *) echo "usage: $0 [up|deploy|check|down|all]" >&2; exit 2 ;;
esac
