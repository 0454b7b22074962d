#!/usr/bin/env bash
# Distributed-run benchmarks, peers in the same run (the machine is shared: read the ratios):
#   1. one process vs `--workers 1`, 2 and 4 local worker processes at one fixed total arrival
#      rate against a static nginx: merged p50/p99 against the single-process run's, and
#      requests per CPU-second of everything loadlab ran (coordinator + workers) against the
#      single process (target >= 0.9), and against one process at the per-worker rate (RATE/N:
#      what a generator process costs per request at that rate anyway, so the ratio isolates
#      what distributing adds);
#   2. latency agreement where the target, not the generator, sets the latency: a target that
#      answers after 10 ms, at DELAY_RATE/s, one process vs the same workers — merged p50/p99
#      should match the single process's;
#   3. the coordinator's merge cost: a `loadlab coordinator` fed realistic reports as fast as it
#      takes them by 200 protocol clients — its CPU per 1 000 worker-reports/s.
# Every configuration runs ROUNDS times, interleaved; the round with the least CPU counts (the
# machine is shared, and other work only ever adds to ours).
# Knobs: RATE (4000/s), DELAY_RATE (400/s), DURATION (10s), WORKERS ("1 2 4"), ROUNDS (2),
# SKIP_BUILD=1.
# Report in benches/out/distributed-<time>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/datastores.sh
source scripts/datastores.sh

RATE=${RATE:-4000}
DURATION=${DURATION:-10s}
WORKERS=${WORKERS:-"1 2 4"}
ROUNDS=${ROUNDS:-2}
DELAY_RATE=${DELAY_RATE:-400}
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
python3 benches/engine/target.py 18491 &
pids+=($!)
for _ in $(seq 1 50); do curl -fs http://127.0.0.1:18490/index.html >/dev/null 2>&1 && break; sleep 0.2; done
curl -fs http://127.0.0.1:18490/index.html >/dev/null || { log "nginx did not start: $(cat "$work/nginx/error.log" 2>/dev/null)"; exit 1; }
for _ in $(seq 1 50); do curl -fs http://127.0.0.1:18491/ok >/dev/null 2>&1 && break; sleep 0.2; done

# /usr/bin/time counts the children loadlab waited for: coordinator + workers together.
timed() { /usr/bin/time -f "%U %S" -o "$work/time" "$@"; }
cpu_s() { awk '{print $1 + $2}' "$work/time"; }

say "loadlab distributed benchmark $(date -u +%FT%TZ) on $(nproc) cores; RATE=$RATE/s DURATION=$DURATION ROUNDS=$ROUNDS"
run_one() { # name, round, rate, extra flags…
  local name=$1 round=$2 rate=$3; shift 3
  log "run: $name (round $round)"
  timed "$loadlab" run --quiet --scenario http --url http://127.0.0.1:18490/index.html \
    --executor constant-arrival-rate --rate "$rate" --duration "$DURATION" \
    --pre-allocated-vus 64 --max-vus 512 --out "$work/${name//\//_}-$round" "$@" > /dev/null || true
  echo "$name $round $(cpu_s)" >> "$work/cpu.txt"
}
: > "$work/cpu.txt"
for round in $(seq 1 "$ROUNDS"); do
  run_one single "$round" "$RATE"
  for w in $WORKERS; do
    run_one "workers-$w" "$round" "$RATE" --workers "$w"
    if [ "$w" -gt 1 ]; then run_one "single/$w" "$round" $((RATE / w)); fi
  done
done
python3 - "$work" <<'PY' | tee -a "$report"
import json, sys
w = sys.argv[1]
best, order = {}, []
for name, rnd, cpu in (l.split() for l in open(f"{w}/cpu.txt")):
    if name not in best:
        order.append(name)
    if name not in best or float(cpu) < float(best[name][1]):
        best[name] = (f"{name.replace('/', '_')}-{rnd}", float(cpu))
def load(name):
    run, cpu = best[name]
    s = json.load(open(f"{w}/{run}/summary.json"))
    m = s["metrics"]
    reqs = m["http_reqs"]["values"]["count"]
    return s, reqs, m["http_req_duration"]["values"], m["dropped_iterations"]["values"]["count"], cpu, reqs / cpu
_, _, bd, _, _, bper = load("single")
print(f"{'run':<10} {'requests':>9} {'dropped':>7} {'p50 ms':>7} {'p99 ms':>7} {'CPU-s':>6} {'req/CPU-s':>10} {'vs single':>9} {'vs 1 proc at RATE/N':>20}")
for name in order:
    if name.startswith("single/"):
        continue
    s, reqs, d, dropped, cpu, per = load(name)
    n = name.split("-")[1] if name.startswith("workers-") else "1"
    same = "" if n == "1" else f"{per / load('single/' + n)[5]:.2f}"
    print(f"{name:<10} {reqs:>9.0f} {dropped:>7.0f} {d['med']:>7.3f} {d['p(99)']:>7.3f} {cpu:>6.2f} {per:>10,.0f} {per / bper:>9.2f} {same:>20}")
    dist = s["run"].get("distributed")
    if dist:
        skew = dist.get("start_skew_ms") or 0.0
        print(f"{'':<10} merged p50/p99 vs single {d['med'] / bd['med']:.2f}/{d['p(99)'] / bd['p(99)']:.2f}; "
              f"coordinator {dist['coordinator_cpu_s']:.2f} CPU-s for {dist['reports']} reports; start skew {skew:.2f} ms")
for name in order:
    if name.startswith("single/"):
        s, reqs, d, dropped, cpu, per = load(name)
        print(f"{name:<10} {reqs:>9.0f} {dropped:>7.0f} {d['med']:>7.3f} {d['p(99)']:>7.3f} {cpu:>6.2f} {per:>10,.0f}   (one process at RATE/{name.split('/')[1]})")
print("(req/CPU-s counts coordinator and workers together; target >= 0.9 x single)")
PY

# 2. Latency agreement against a 10 ms target.
log "latency agreement: 10 ms target at $DELAY_RATE/s"
for w in 0 $WORKERS; do
  flags=(); [ "$w" -gt 0 ] && flags=(--workers "$w")
  "$loadlab" run --quiet --scenario http --url http://127.0.0.1:18491/delay/10 \
    --executor constant-arrival-rate --rate "$DELAY_RATE" --duration "$DURATION" \
    --pre-allocated-vus 32 --max-vus 256 --out "$work/delay-$w" "${flags[@]}" > /dev/null || true
done
python3 - "$work" $WORKERS <<'PY' | tee -a "$report"
import json, sys
w, workers = sys.argv[1], sys.argv[2:]
def d(n):
    m = json.load(open(f"{w}/delay-{n}/summary.json"))["metrics"]
    return m["http_reqs"]["values"]["count"], m["http_req_duration"]["values"]
reqs, base = d(0)
print(f"10 ms target: single  {reqs:.0f} requests p50 {base['med']:.3f} ms p99 {base['p(99)']:.3f} ms")
for n in workers:
    reqs, v = d(n)
    print(f"10 ms target: workers-{n} {reqs:.0f} requests p50 {v['med']:.3f} ms p99 {v['p(99)']:.3f} ms "
          f"(vs single {v['med'] / base['med']:.3f} / {v['p(99)'] / base['p(99)']:.3f})")
PY

# 3. The coordinator's merge cost.
log "coordinator merge benchmark"
bench_bin=$(find "$target_dir/release/deps" -maxdepth 1 -type f -executable -name 'distributed-*' -printf '%T@ %p\n' 2>/dev/null | sort -rn | head -n1 | cut -d' ' -f2-)
[ -n "$bench_bin" ] || { log "no release build of the distributed tests (unset SKIP_BUILD)"; exit 1; }
"$bench_bin" --ignored --exact bench::coordinator_cpu_per_thousand_reports_per_second --nocapture 2>/dev/null \
  | grep '^coordinator merge' | tee -a "$report"
say "report: $report"
