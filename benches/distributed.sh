#!/usr/bin/env bash
# Distributed-run benchmarks, peers in the same run (the machine is shared: read the ratios):
#   1. one process vs `--workers 1`, 2 and 4 local worker processes at one fixed total arrival
#      rate against a static nginx: merged p50/p99 against the single-process run's, and
#      requests per CPU-second of everything loadlab ran (coordinator + workers) against the
#      single process (target >= 0.9);
#   2. the coordinator's merge cost: a `loadlab coordinator` fed realistic reports as fast as it
#      takes them by 20 protocol clients — its CPU per 1 000 worker-reports/s.
# Knobs: RATE (2000/s), DURATION (15s), WORKERS ("1 2 4"), SKIP_BUILD=1.
# Report in benches/out/distributed-<time>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/datastores.sh
source scripts/datastores.sh

RATE=${RATE:-2000}
DURATION=${DURATION:-15s}
WORKERS=${WORKERS:-"1 2 4"}
target_dir=${CARGO_TARGET_DIR:-target}
out_dir=benches/out
mkdir -p "$out_dir"
report="$out_dir/distributed-$(date +%Y%m%d-%H%M%S).txt"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
say() { echo "$*" | tee -a "$report"; }
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

command -v nginx >/dev/null || apt_install nginx-light || apt_install nginx
if [ -z "${SKIP_BUILD:-}" ]; then
  log "building loadlab and the distributed tests (release)"
  cargo build --release -q -p loadlab
  cargo test --release -q -p loadlab --test distributed --no-run 2>/dev/null
fi
loadlab=$target_dir/release/loadlab

# nginx, one worker, a small static file (as benches/engine.sh).
mkdir -p "$work/nginx/html" "$work/nginx/tmp"
echo -n "hello from nginx" > "$work/nginx/html/index.html"
chmod 755 "$work" "$work/nginx" "$work/nginx/html"; chmod 644 "$work/nginx/html/index.html"
cat > "$work/nginx/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 16384; }
http {
  access_log off;
  client_body_temp_path $work/nginx/tmp; proxy_temp_path $work/nginx/tmp; fastcgi_temp_path $work/nginx/tmp;
  uwsgi_temp_path $work/nginx/tmp; scgi_temp_path $work/nginx/tmp;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:18490; root $work/nginx/html; location / { } }
}
CONF
nginx -c "$work/nginx/nginx.conf" &
pids+=($!)
for _ in $(seq 1 50); do curl -fs http://127.0.0.1:18490/index.html >/dev/null 2>&1 && break; sleep 0.2; done
curl -fs http://127.0.0.1:18490/index.html >/dev/null || { log "nginx did not start: $(cat "$work/nginx/error.log" 2>/dev/null)"; exit 1; }

# /usr/bin/time counts the children loadlab waited for: coordinator + workers together.
timed() { /usr/bin/time -f "%U %S" -o "$work/time" "$@"; }
cpu_s() { awk '{print $1 + $2}' "$work/time"; }

say "loadlab distributed benchmark $(date -u +%FT%TZ) on $(nproc) cores; RATE=$RATE/s DURATION=$DURATION"
run_one() { # name, extra flags…
  local name=$1; shift
  log "run: $name"
  timed "$loadlab" run --quiet --scenario http --url http://127.0.0.1:18490/index.html \
    --executor constant-arrival-rate --rate "$RATE" --duration "$DURATION" \
    --pre-allocated-vus 64 --max-vus 512 --out "$work/$name" "$@" > /dev/null || true
  echo "$name $(cpu_s)" >> "$work/cpu.txt"
}
: > "$work/cpu.txt"
run_one single
for w in $WORKERS; do run_one "workers-$w" --workers "$w"; done
python3 - "$work" <<'PY' | tee -a "$report"
import json, sys
w = sys.argv[1]
rows = [l.split() for l in open(f"{w}/cpu.txt")]
def load(name):
    s = json.load(open(f"{w}/{name}/summary.json"))
    m = s["metrics"]
    return s, m["http_reqs"]["values"]["count"], m["http_req_duration"]["values"], m["dropped_iterations"]["values"]["count"]
base = None
print(f"{'run':<11} {'requests':>9} {'dropped':>7} {'p50 ms':>7} {'p99 ms':>7} {'CPU-s':>6} {'req/CPU-s':>10} {'vs single':>9}  coordinator")
for name, cpu in rows:
    s, reqs, d, dropped = load(name)
    cpu = float(cpu); per = reqs / cpu if cpu else float("nan")
    if base is None:
        base = (per, d["med"], d["p(99)"])
    ratio = per / base[0]
    coord = ""
    dist = s["run"].get("distributed")
    if dist:
        skew = dist.get("start_skew_ms") or 0.0
        coord = (f"{dist['coordinator_cpu_s']:.2f} CPU-s for {dist['reports']} reports; "
                 f"start skew {skew:.2f} ms; p50/p99 vs single {d['med'] / base[1]:.2f}/{d['p(99)'] / base[2]:.2f}")
    print(f"{name:<11} {reqs:>9.0f} {dropped:>7.0f} {d['med']:>7.3f} {d['p(99)']:>7.3f} {cpu:>6.2f} {per:>10,.0f} {ratio:>9.2f}  {coord}")
print("(requests per CPU-second counts coordinator and workers together; target >= 0.9 x single)")
PY

# 2. The coordinator's merge cost.
log "coordinator merge benchmark"
bench_bin=$(find "$target_dir/release/deps" -maxdepth 1 -type f -executable -name 'distributed-*' -printf '%T@ %p\n' 2>/dev/null | sort -rn | head -n1 | cut -d' ' -f2-)
[ -n "$bench_bin" ] || { log "no release build of the distributed tests (unset SKIP_BUILD)"; exit 1; }
"$bench_bin" --ignored --exact bench::coordinator_cpu_per_thousand_reports_per_second --nocapture 2>/dev/null \
  | grep '^coordinator merge' | tee -a "$report"
say "report: $report"
