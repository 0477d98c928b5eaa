#!/usr/bin/env bash
# Starts or stops the services on this machine (used by `make run` / `make stop`).
# State lives in .local/: the development JWT secret, pid files and logs.
set -euo pipefail
cd "$(dirname "$0")/.."
action=$1; shift
services=("$@")
mkdir -p .local/logs
export JWT_SECRET_FILE=${JWT_SECRET_FILE:-$PWD/.local/jwt-secret}
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/crm}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
# outreach reads names and addresses from profiles at send time, and asks
# profiles (consent) and feedback (open complaints) right before each hand-off.
export OUTREACH_PROFILES_URL=${OUTREACH_PROFILES_URL:-http://127.0.0.1:50051}
export OUTREACH_FEEDBACK_URL=${OUTREACH_FEEDBACK_URL:-http://127.0.0.1:50054}
# feedback checks customers in profiles and acknowledges them through outreach.
export FEEDBACK_PROFILES_URL=${FEEDBACK_PROFILES_URL:-http://127.0.0.1:50051}
export FEEDBACK_OUTREACH_URL=${FEEDBACK_OUTREACH_URL:-http://127.0.0.1:50053}
port_of() { case $1 in profiles) echo 50051;; segmentation) echo 50052;; outreach) echo 50053;; feedback) echo 50054;; analytics) echo 50055;; *) echo 0;; esac; }
alive() { [[ -f .local/$1.pid ]] && kill -0 "$(cat ".local/$1.pid")" 2>/dev/null; }

case $action in
stop)
  for s in "${services[@]}"; do
    if alive "$s"; then kill -TERM "$(cat ".local/$s.pid")"; echo "stopping $s"; fi
    rm -f ".local/$s.pid"
  done
  exit 0;;
start) ;;
*) echo "usage: run-local.sh start|stop SERVICE..."; exit 2;;
esac

if [[ ${#services[@]} -eq 0 ]]; then
  echo "No service exists yet under services/: nothing to start."; exit 0
fi
[[ -s $JWT_SECRET_FILE ]] || { head -c 48 /dev/urandom | base64 | tr -d '\n' > "$JWT_SECRET_FILE"; chmod 600 "$JWT_SECRET_FILE"; }
echo "building the services (optimised; the first build takes a few minutes)..."
cargo build --locked -q --profile local $(printf -- '-p crm-%s ' "${services[@]}") -p crm-kit -p crm-demo --bins
bin=target/local
for s in "${services[@]}"; do
  if alive "$s"; then echo "$s already running (pid $(cat ".local/$s.pid"))"; continue; fi
  "$bin/crm-$s" migrate >> ".local/logs/$s.log" 2>&1 || { echo "migrating $s failed: see .local/logs/$s.log"; exit 1; }
  SHUTDOWN_DRAIN_DELAY_MS=0 CONSUMER_BATCH_SIZE=${CONSUMER_BATCH_SIZE:-500} nohup "$bin/crm-$s" serve >> ".local/logs/$s.log" 2>&1 &
  echo $! > ".local/$s.pid"
done
for s in "${services[@]}"; do
  port=$(port_of "$s")
  for _ in $(seq 1 40); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.25; done
  if ! alive "$s"; then echo "$s failed to start: see .local/logs/$s.log"; exit 1; fi
  echo "  $s: grpc 127.0.0.1:$port  metrics http://127.0.0.1:$((port + 1000))/metrics  log .local/logs/$s.log"
done
if [[ -x scripts/load-demo-data.sh ]]; then bash scripts/load-demo-data.sh; fi
# The first start also runs the retention loop once (make demo runs it again).
if [[ ${DEMO:-} != skip && ! -f .local/demo-done ]] && [[ -x $bin/crm-demo ]]; then
  echo "first start: running the retention loop demo (make demo runs it again)..."
  if "$bin/crm-demo" run; then touch .local/demo-done; else echo "the demo failed: see .local/logs/"; fi
fi
cat <<TXT

Services are running. Get a token and call them, e.g.:
  export TOKEN=\$(make -s token)
  grpcurl -plaintext -H "authorization: Bearer \$TOKEN" 127.0.0.1:50051 list
Stop them with: make stop
TXT
