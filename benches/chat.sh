#!/usr/bin/env bash
# Chat benchmarks on Redis + PostgreSQL, load from loadlab's own `chat` scenario (WebSocket
# clients that stamp each message with its send time, so every receiver measures delivery):
#   1. connections: CONNS idle WebSocket connections on one gateway — the gateway's RSS per
#      connection (growth over its idle baseline / connections), next to Centrifugo's published
#      figures (≈ 27 KB default, ≈ 12 KB tuned).
#   2. fan-out: two gateway replicas, rooms of 100 members spread over both, every member sending
#      every INTERVAL_MS — deliveries/s and end-to-end delivery latency (sender's send → every
#      receiver's frame), with redis-benchmark's PUBLISH rate in the same run as the ceiling.
#   3. durability cost: the same fan-out with one transaction per message (--commit-batch 1) vs
#      group commit (default), as a ratio.
#
# Knobs (environment): CONNS (10000), MEMBERS (1000: members in all, 100 per room), INTERVAL_MS
# (1000: 100 000 deliveries/s offered), DURATION (30s), SKIP_BUILD=1, ONLY=connections|fanout. Output also goes to benches/out/chat-<time>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/datastores.sh
source scripts/datastores.sh

CONNS=${CONNS:-10000}
MEMBERS=${MEMBERS:-1000}
INTERVAL_MS=${INTERVAL_MS:-1000}
DURATION=${DURATION:-30s}
out_dir=benches/out
mkdir -p "$out_dir"
report="$out_dir/chat-$(date +%Y%m%d-%H%M%S).txt"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
say() { echo "$*" | tee -a "$report"; }

# 10 000 sockets on each side of loopback.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

ensure_postgres
ensure_redis
if [ -z "${SKIP_BUILD:-}" ]; then
  log "building release binaries"
  cargo build --release -q -p loadlab-feed -p loadlab-timeline -p loadlab-chat-gateway -p loadlab-presence -p loadlab
fi
bin=target/release
export LOADLAB_JWT_SECRET=bench-secret-0123456789abcdef LOADLAB_LOG=warn
stamp=$(date +%s)
schema="bench_chat_$stamp"
common=(--engine redis --redis-prefix "benchchat:$stamp:" --database-url "$LOADLAB_TEST_POSTGRES_URL" --database-schema "$schema")

wait_ready() {
  for _ in $(seq 1 200); do curl -fs "$1/readyz" >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "$1 never became ready"; exit 1
}
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
metric() { curl -fs "$1/metrics" | awk -v n="$2" '$1 == n {print $2}'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# feed (sign-ups; it migrates the schema for everyone) and timeline, presence.
"$bin/loadlab-timeline" "${common[@]}" --listen 127.0.0.1:18381 --feed-url http://127.0.0.1:18380 &
pids+=($!)
"$bin/loadlab-feed" "${common[@]}" --migrate --password-memory-kib 256 --password-iterations 1 \
  --listen 127.0.0.1:18380 --timeline-url http://127.0.0.1:18381 &
pids+=($!)
"$bin/loadlab-presence" "${common[@]}" --listen 127.0.0.1:18383 &
pids+=($!)
wait_ready http://127.0.0.1:18380
wait_ready http://127.0.0.1:18383

gateway_pids=()
start_gateways() { # start_gateways EXTRA_FLAGS...: two replicas on :18382 and :18384
  gateway_pids=()
  for port in 18382 18384; do
    "$bin/loadlab-chat-gateway" "${common[@]}" --listen "127.0.0.1:$port" \
      --presence-url http://127.0.0.1:18383 --idle-timeout 10m --ping-interval 60s "$@" &
    gateway_pids+=($!); pids+=($!)
  done
  wait_ready http://127.0.0.1:18382
  wait_ready http://127.0.0.1:18384
}
stop_gateways() { kill -TERM "${gateway_pids[@]}" 2>/dev/null || true; wait "${gateway_pids[@]}" 2>/dev/null || true; }

run_chat() { # run_chat NAME GATEWAYS VUS CHANNELS INTERVAL_MS RAMP HOLD (RAMP 0s: constant-vus)
  local name=$1 gateways=$2 vus=$3 channels=$4 interval=$5 ramp=$6 hold=$7 executor
  if [ "$ramp" = 0s ]; then
    executor="{type: constant-vus, vus: $vus, duration: $hold, gracefulStop: 5s}"
  else
    executor="{type: ramping-vus, startVUs: 0, stages: [{duration: $ramp, target: $vus}, {duration: $hold, target: $vus}], gracefulStop: 5s}"
  fi
  cat > "$work/$name.yaml" <<YAML
target: {feed: "http://127.0.0.1:18380", chat: "$gateways"}
scenario:
  name: chat
  params: {users: 200, channels: $channels, messageIntervalMs: $interval, sessionDuration: 1h}
executor: $executor
YAML
  /usr/bin/time -f "%U %S %e" -o "$work/$name-time.txt" \
    "$bin/loadlab" run --quiet -f "$work/$name.yaml" --out "$work/$name" >"$work/$name.log" 2>&1 || true
  if [ ! -f "$work/$name/summary.json" ]; then
    say "[$name] loadlab run wrote no summary; its output:"; tail -n 20 "$work/$name.log" | tee -a "$report"; exit 1
  fi
}

say "loadlab chat benchmark $(date -u +%FT%TZ) on $(nproc) cores; CONNS=$CONNS MEMBERS=$MEMBERS INTERVAL_MS=$INTERVAL_MS DURATION=$DURATION"

# 1. Idle connections on one gateway (messages every hour: nothing is sent while we measure).
if [ "${ONLY:-connections}" = connections ]; then
start_gateways
gw=${gateway_pids[0]}
sleep 1
base_rss=$(rss_kib "$gw")
log "[connections] $CONNS idle WebSocket connections on one gateway"
run_chat idle http://127.0.0.1:18382 "$CONNS" 100 3600000 20s 40s &
runner=$!
peak_conns=0 peak_rss=$base_rss
while kill -0 "$runner" 2>/dev/null; do
  c=$(metric http://127.0.0.1:18382 loadlab_chat_connections || echo 0)
  r=$(rss_kib "$gw")
  if [ "${c%.*}" -ge "$peak_conns" ] 2>/dev/null; then peak_conns=${c%.*}; peak_rss=$r; fi
  sleep 1
done
wait "$runner" || true
python3 - "$base_rss" "$peak_rss" "$peak_conns" "$CONNS" <<'PY' | tee -a "$report"
import sys
base, peak, conns, want = (int(float(x)) for x in sys.argv[1:])
per = (peak - base) * 1024 / max(conns, 1)
print(f"[connections] {conns} of {want} connected at once; gateway RSS {base/1024:.1f} MiB idle -> "
      f"{peak/1024:.1f} MiB: {per/1000:.1f} KB per connection (target <= 20 KB; Centrifugo ~27 KB default, ~12 KB tuned)")
PY
python3 - "$work/idle/summary.json" <<'PY' | tee -a "$report"
import json, sys
m = json.load(open(sys.argv[1]))["metrics"]
v = lambda k, f: m.get(k, {}).get("values", {}).get(f, 0)
print(f"[connections] sessions {v('ws_sessions','count'):.0f}, failed {v('ws_session_failures','count'):.0f}, "
      f"handshake p50 {v('ws_connecting','med'):.1f} ms, p99 {v('ws_connecting','p(99)'):.1f} ms")
PY
stop_gateways
fi

# 2./3. Fan-out across two replicas: MEMBERS members in rooms of 100, half on each gateway.
fanout() { # fanout LABEL GATEWAY_FLAGS...
  local label=$1; shift
  start_gateways "$@"
  local g0=${gateway_pids[0]} g1=${gateway_pids[1]} r
  r=$(pgrep -o -f 'redis-server .*:6379' || pgrep -o redis-server)
  local t0 c0 c1 cr; t0=$(date +%s.%N); c0=$(cpu_ticks "$g0"); c1=$(cpu_ticks "$g1"); cr=$(cpu_ticks "$r")
  log "[$label] $MEMBERS members in rooms of 100 over two gateways, one message each per ${INTERVAL_MS} ms"
  run_chat "$label" "http://127.0.0.1:18382,http://127.0.0.1:18384" "$MEMBERS" $((MEMBERS / 100)) "$INTERVAL_MS" 0s "$DURATION"
  local hz; hz=$(getconf CLK_TCK)
  python3 - "$work/$label/summary.json" "$work/$label-time.txt" "$label" "$t0" "$hz" \
    "$c0" "$(cpu_ticks "$g0")" "$c1" "$(cpu_ticks "$g1")" "$cr" "$(cpu_ticks "$r")" \
    "$(curl -fs http://127.0.0.1:18382/metrics | awk '/^loadlab_chat_commit_batch_size_(sum|count)/ {print $2}' | paste -sd/)" <<'PY' | tee -a "$report"
import json, sys
s = json.load(open(sys.argv[1])); m = s["metrics"]
v = lambda k, f: m.get(k, {}).get("values", {}).get(f, 0)
label = sys.argv[3]; hz = float(sys.argv[5])
ticks = [float(x) for x in sys.argv[6:12]]
secs = s["run"]["duration_s"]
recv, sent = v("ws_msgs_received", "count"), v("ws_msgs_sent", "count")
u, sy, w = map(float, open(sys.argv[2]).read().split()[-3:])  # GNU time may print "Command exited with …" first
batch = sys.argv[12].split("/") if sys.argv[12] else []
avg_batch = (float(batch[0]) / float(batch[1])) if len(batch) == 2 and float(batch[1]) else 0
rate = recv / secs if secs else 0
print(f"[{label}] {sent:.0f} messages sent, {recv:.0f} deliveries in {secs:.0f} s: {rate:.0f} deliveries/s "
      f"(target >= 50000); delivery latency p50 {v('ws_delivery_latency','med'):.1f} ms, "
      f"p95 {v('ws_delivery_latency','p(95)'):.1f} ms, p99 {v('ws_delivery_latency','p(99)'):.1f} ms (target <= 100); "
      f"session failures {v('ws_session_failures','count'):.0f}; checks failed {v('checks','fails'):.0f}")
# CPU per delivery is independent of how long set-up took around the measured window.
per = lambda a, b: (b - a) / hz * 1e6 / max(recv, 1)
print(f"[{label}] CPU per delivery: gateways {per(ticks[0], ticks[1]) + per(ticks[2], ticks[3]):.1f} µs, "
      f"redis {per(ticks[4], ticks[5]):.1f} µs, loadlab generator {(u + sy) * 1e6 / max(recv, 1):.1f} µs; mean commit batch on gateway-a {avg_batch:.1f} messages; "
      f"generator {'SATURATED' if s['run']['generator']['saturated'] else 'ok'}")
open(f"{sys.argv[1]}.rate", "w").write(f"{rate} {v('ws_delivery_latency','p(99)')}")
PY
  stop_gateways
}
if [ "${ONLY:-fanout}" = fanout ]; then
fanout group-commit
fanout one-txn-per-message --commit-batch 1
python3 - "$work/group-commit/summary.json.rate" "$work/one-txn-per-message/summary.json.rate" <<'PY' | tee -a "$report"
import sys
(g, gp), (o, op) = (map(float, open(p).read().split()) for p in sys.argv[1:])
print(f"[durability] group commit vs one transaction per message: deliveries/s {g:.0f} vs {o:.0f} "
      f"(x{g / o if o else float('inf'):.2f}), p99 {gp:.1f} ms vs {op:.1f} ms")
PY
fi

log "redis-benchmark PUBLISH, same machine (the pub/sub ceiling)"
say "redis-benchmark: PUBLISH $(redis-benchmark -q -c 50 -n 200000 publish benchchat:x hello 2>/dev/null | tr '\r' '\n' | awk '/requests per second/ {print $(NF-5)}' | tail -n1)/s"

for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=()
redis-cli -u "$LOADLAB_TEST_REDIS_URL" --scan --pattern "benchchat:$stamp:*" | xargs -r -n 500 redis-cli -u "$LOADLAB_TEST_REDIS_URL" unlink >/dev/null
psql -X -q "$LOADLAB_TEST_POSTGRES_URL" -c "set client_min_messages = warning; drop schema if exists $schema cascade" >/dev/null
say "report: $report"
