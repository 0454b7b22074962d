// k6: home-timeline reads at a constant arrival rate (open model), for latency at a fixed load.
import http from 'k6/http';
import { check } from 'k6';

const base = __ENV.LOADLAB_BENCH_URL;
const rate = parseInt(__ENV.LOADLAB_BENCH_RATE);
const users = open(__ENV.LOADLAB_BENCH_USERS).trim().split('\n').map((l) => l.split(' '));

export const options = {
  discardResponseBodies: true,
  scenarios: {
    reads: {
      executor: 'constant-arrival-rate',
      rate: rate,
      timeUnit: '1s',
      duration: __ENV.LOADLAB_BENCH_DURATION || '20s',
      preAllocatedVUs: 200,
      maxVUs: 1000,
    },
  },
};

export default function () {
  const [id, token] = users[Math.floor(Math.random() * users.length)];
  const r = http.get(`${base}/v1/users/${id}/timeline?limit=50`, {
    headers: { Authorization: `Bearer ${token}` },
  });
  check(r, { ok: (res) => res.status === 200 });
}
