// k6: post creation at a constant arrival rate, to measure fan-out lag under a sustainable load.
import http from 'k6/http';
import { check } from 'k6';

const base = __ENV.LOADLAB_BENCH_URL;
const users = open(__ENV.LOADLAB_BENCH_USERS).trim().split('\n').map((l) => l.split(' '));

export const options = {
  discardResponseBodies: true,
  scenarios: {
    posts: {
      executor: 'constant-arrival-rate',
      rate: parseInt(__ENV.LOADLAB_BENCH_RATE),
      timeUnit: '1s',
      duration: __ENV.LOADLAB_BENCH_DURATION || '20s',
      preAllocatedVUs: 100,
      maxVUs: 1000,
    },
  },
};

export default function () {
  const [, token] = users[Math.floor(Math.random() * users.length)];
  const r = http.post(`${base}/v1/posts`, JSON.stringify({ body: `k6 post ${__ITER}` }), {
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
  });
  check(r, { created: (res) => res.status === 201 });
}
