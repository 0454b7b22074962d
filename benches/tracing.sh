#!/usr/bin/env bash
# Tracing overhead on warm home-timeline reads: max throughput with wrk against feed + timeline
# (release binaries, separate processes, Redis + PostgreSQL) with telemetry off, and with the
# OTLP exporters pointed at a local receiver (`loadlab receive`) at trace sampling ratios
# 0, 0.01, 0.1 and 1.0 (wrk sends no traceparent, so the services' own ratio decides).
# Prints each configuration's throughput as a ratio of the no-telemetry baseline, which is
# measured before and after each round of ratios (their mean is that round's reference: this
# machine is shared and noisy).
# Targets: >= 0.95 at 0.01 and >= 0.85 at 1.0.
#
# Knobs (environment): DURATION (15s), CONNECTIONS (64), THREADS (2), READERS (500),
# RATIOS ("0 0.01 0.1 1.0"), ROUNDS (1; the median of the rounds is reported), SKIP_BUILD=1,
# PERF=1 (record `perf` profiles of timeline, feed and the receiver in each run into
# benches/out/perf-*.data, with extra `perf record` flags from PERF_FLAGS, e.g.
# "--call-graph dwarf"; needs Debian's linux-perf).
# Output also goes to benches/out/tracing-<time>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/datastores.sh
source scripts/datastores.sh

DURATION=${DURATION:-15s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
READERS=${READERS:-500}
RATIOS=${RATIOS:-0 0.01 0.1 1.0}
ROUNDS=${ROUNDS:-1}
out_dir=benches/out
mkdir -p "$out_dir"
report="$out_dir/tracing-$(date +%Y%m%d-%H%M%S).txt"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
say() { echo "$*" | tee -a "$report"; }

ensure_postgres
ensure_redis
command -v wrk >/dev/null || apt_install wrk
if [ -z "${SKIP_BUILD:-}" ]; then
  log "building release binaries"
  cargo build --release -q -p loadlab-feed -p loadlab-timeline -p loadlab
fi
bin=${CARGO_TARGET_DIR:-target}/release
export LOADLAB_JWT_SECRET=bench-secret-0123456789abcdef
schema="bench_tracing_$(date +%s)"
prefix="bench:tracing:$(date +%s):"
common=(--engine redis --redis-prefix "$prefix" --database-url "$LOADLAB_TEST_POSTGRES_URL"
  --database-schema "$schema" --database-pool 32)
feed_port=18380
timeline_port=18381
receiver=127.0.0.1:18317

wait_ready() {
  for _ in $(seq 1 200); do curl -fs "$1/readyz" >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "$1 never became ready"; exit 1
}

svc=()
start_services() { # start_services [TELEMETRY FLAGS...]
  LOADLAB_LOG=warn "$bin/loadlab-timeline" "${common[@]}" "$@" \
    --listen "127.0.0.1:$timeline_port" --feed-url "http://127.0.0.1:$feed_port" >> "$work/services.log" 2>&1 &
  svc=($!)
  LOADLAB_LOG=warn "$bin/loadlab-feed" "${common[@]}" "$@" --migrate \
    --password-memory-kib 256 --password-iterations 1 \
    --listen "127.0.0.1:$feed_port" --timeline-url "http://127.0.0.1:$timeline_port" >> "$work/services.log" 2>&1 &
  svc+=($!)
  pids+=("${svc[@]}")
  wait_ready "http://127.0.0.1:$timeline_port"
  wait_ready "http://127.0.0.1:$feed_port"
}
# Service logs go to a file: measure's stdout is its figure.
stop_services() { kill -TERM "${svc[@]}"; wait "${svc[@]}" 2>/dev/null || true; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # user + system, clock ticks

measure() { # measure LABEL [TELEMETRY FLAGS...]: prints req/s
  local label=$1; shift
  # A fresh receiver for each run with telemetry: one that had filled up (it keeps at most
  # 500 000 spans) would do less work per span and flatter the next runs.
  if [ $# -gt 0 ]; then
    LOADLAB_LOG=warn "$bin/loadlab" receive --listen "$receiver" > "$work/receiver.txt" &
    rcv=$!; pids+=("$rcv")
    for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/${receiver%:*}/${receiver#*:}") 2>/dev/null && break; sleep 0.1; done
  else
    rcv=$$ # no receiver: its column is this script's (idle) CPU
  fi
  start_services "$@"
  # Warm connections, caches and the allocator before measuring.
  LOADLAB_BENCH_USERS="$work/seed/readers.txt" LOADLAB_BENCH_LIMIT=20 \
    wrk -t"$THREADS" -c"$CONNECTIONS" -d3s -s benches/feed/read.lua "http://127.0.0.1:$feed_port" >/dev/null
  # CPU of each process in svc's order (timeline, feed), then the receiver.
  local before=() after=() p
  for p in "${svc[@]}" "$rcv"; do before+=("$(cpu_ticks "$p")"); done
  if [ -n "${PERF:-}" ]; then # profiles of timeline, feed (and the receiver) over the first 6 s
    local tag=${label//[^a-z0-9.]/_} i=0 name targets=("${svc[@]}")
    [ $# -gt 0 ] && targets+=("$rcv")
    for name in timeline feed receiver; do
      [ "$i" -lt "${#targets[@]}" ] || break
      # shellcheck disable=SC2086 # PERF_FLAGS is a list of flags
      perf record -F 999 ${PERF_FLAGS:-} -o "$out_dir/perf-$tag-$name.data" -p "${targets[$i]}" -- sleep 6 >/dev/null 2>&1 &
      i=$((i + 1))
    done
  fi
  LOADLAB_BENCH_USERS="$work/seed/readers.txt" LOADLAB_BENCH_LIMIT=20 \
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" -s benches/feed/read.lua "http://127.0.0.1:$feed_port" > "$work/$label.txt"
  for p in "${svc[@]}" "$rcv"; do after+=("$(cpu_ticks "$p")"); done
  stop_services
  if [ $# -gt 0 ]; then
    kill -TERM "$rcv"; wait "$rcv" 2>/dev/null || true
    # The last run's receiver report (ratio 1.0's, with the default RATIOS) is printed at the end.
    cp "$work/receiver.txt" "$work/receiver-last.txt"
  fi
  local rps non2xx requests
  rps=$(awk '/^Requests\/sec/ {print $2}' "$work/$label.txt")
  requests=$(awk '/requests in/ {print $1}' "$work/$label.txt")
  non2xx=$(awk '/Non-2xx/ {print $5}' "$work/$label.txt")
  # Where the CPU goes: microseconds of CPU per request in each process.
  local cpu
  cpu=$(python3 -c "
import os
hz, n = os.sysconf('SC_CLK_TCK'), max(int('${requests:-0}'), 1)
b, a = [int(x) for x in '${before[*]}'.split()], [int(x) for x in '${after[*]}'.split()]
print(' '.join(f'{name} {(y - x) / hz / n * 1e6:.1f}' for name, x, y in zip(('timeline', 'feed', 'receiver'), b, a)))
")
  say "[$label] ${rps} req/s; non-2xx: ${non2xx:-0}; CPU us/request: $cpu" >&2
  echo "$rps"
}

say "loadlab tracing overhead $(date -u +%FT%TZ) on $(nproc) cores; DURATION=$DURATION CONNECTIONS=$CONNECTIONS READERS=$READERS"
log "seeding ${READERS} readers"
start_services
python3 benches/feed/seed.py --url "http://127.0.0.1:$feed_port" --out "$work/seed" --readers "$READERS" >/dev/null
# Fan-out of the seed posts must finish before measuring.
for _ in $(seq 1 600); do
  [ "$(curl -fs "http://127.0.0.1:$feed_port/metrics" | awk '$1 == "loadlab_fanout_backlog" {print $2}')" = 0 ] && break
  sleep 0.2
done
stop_services

# Each round measures every ratio between two no-telemetry runs and divides by their mean, so
# drift of the shared machine during a round cancels; ROUNDS > 1 reports the median.
declare -A ratios
prev=$(measure "no telemetry (before round 1)")
for round in $(seq 1 "$ROUNDS"); do
  declare -A cur=()
  for r in $RATIOS; do
    cur[$r]=$(measure "sampling $r (round $round)" --otlp-endpoint "http://$receiver" --trace-sample-ratio "$r")
  done
  next=$(measure "no telemetry (after round $round)")
  for r in $RATIOS; do
    ratios[$r]+="$(python3 -c "print(${cur[$r]} / (($prev + $next) / 2))") "
  done
  prev=$next
done
# What the receiver of the last run with telemetry got, with its per-service span breakdown
# (spans per read = count / reads, warm-up included).
say "$(tail -n +2 "$work/receiver-last.txt")"
for r in $RATIOS; do
  say "$(python3 -c "
import statistics
r, vs = '$r', [float(v) for v in '${ratios[$r]}'.split()]
m = statistics.median(vs)
target = {'0.01': 0.95, '1.0': 0.85}.get(r)
verdict = '' if target is None else (' (target >= %.2f: %s)' % (target, 'met' if m >= target else 'MISSED'))
print(f'sampling {r}: {m:.3f} x no telemetry (median of {len(vs)}: ' + ', '.join(f'{v:.3f}' for v in vs) + f'){verdict}')
")"
done
psql -X -q "$LOADLAB_TEST_POSTGRES_URL" -c "drop schema if exists $schema cascade" >/dev/null
redis-cli -u "$LOADLAB_TEST_REDIS_URL" --scan --pattern "${prefix}*" | xargs -r -n 500 redis-cli -u "$LOADLAB_TEST_REDIS_URL" unlink >/dev/null
say "report: $report"
