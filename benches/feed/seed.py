#!/usr/bin/env python3
"""Seeds a running feed for benchmarks through its public API (stdlib only).

Creates `readers` users who each follow `follows` of `authors` authors (each of whom posts
`posts` times), plus `posters` authors with `followers` followers each (drawn from the readers).
Every reader's home timeline is read once, so timelines are materialised and posts cached (warm).
Writes `<out>/readers.txt` and `<out>/posters.txt` as "id token" lines.
"""
import argparse
import concurrent.futures as cf
import json
import os
import random
import sys
import urllib.error
import urllib.request


def call(base, method, path, token=None, body=None, expect=(200, 201, 204)):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", "Bearer " + token)
    for attempt in range(5):
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                raw = r.read()
                if r.status not in expect:
                    raise RuntimeError(f"{method} {path}: {r.status} {raw[:200]!r}")
                return json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            if e.code == 503 and attempt < 4:
                continue
            raise RuntimeError(f"{method} {path}: {e.code} {e.read()[:200]!r}") from e


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--readers", type=int, default=1000)
    p.add_argument("--authors", type=int, default=200)
    p.add_argument("--follows", type=int, default=10)
    p.add_argument("--posts", type=int, default=10)
    p.add_argument("--posters", type=int, default=100)
    p.add_argument("--followers", type=int, default=100)
    p.add_argument("--threads", type=int, default=32)
    a = p.parse_args()
    rnd = random.Random(42)
    tag = os.urandom(3).hex()
    pool = cf.ThreadPoolExecutor(a.threads)

    def register(name):
        u = call(a.url, "POST", "/v1/users", body={"handle": name, "password": "benchmark-pw"})
        return (u["id"], u["token"])

    readers = list(pool.map(register, [f"r{tag}_{i}" for i in range(a.readers)]))
    authors = list(pool.map(register, [f"a{tag}_{i}" for i in range(a.authors)]))
    posters = list(pool.map(register, [f"p{tag}_{i}" for i in range(a.posters)]))
    print(f"seed: {len(readers)} readers, {len(authors)} authors, {len(posters)} posters", file=sys.stderr)

    edges = []
    for r in readers:
        for au in rnd.sample(authors, a.follows):
            edges.append((r, au))
    for po in posters:
        for r in rnd.sample(readers, a.followers):
            edges.append((r, po))
    list(pool.map(lambda e: call(a.url, "POST", f"/v1/users/{e[0][0]}/follows/{e[1][0]}", token=e[0][1]), edges))
    print(f"seed: {len(edges)} follows", file=sys.stderr)

    # Materialise every reader's home timeline before posting, so posts arrive by fan-out.
    list(pool.map(lambda r: call(a.url, "GET", f"/v1/users/{r[0]}/timeline?limit=1", token=r[1]), readers))
    jobs = [(au, i) for au in authors for i in range(a.posts)]
    list(pool.map(lambda j: call(a.url, "POST", "/v1/posts", token=j[0][1], body={"body": f"seed post {j[1]} by {j[0][0]}"}), jobs))
    print(f"seed: {len(jobs)} posts", file=sys.stderr)

    os.makedirs(a.out, exist_ok=True)
    for name, users in (("readers", readers), ("posters", posters)):
        with open(os.path.join(a.out, f"{name}.txt"), "w") as f:
            for uid, token in users:
                f.write(f"{uid} {token}\n")


if __name__ == "__main__":
    main()
