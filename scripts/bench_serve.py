#!/usr/bin/env python3
"""Bounded load benchmark of `m3 serve` (loopback only; stops by itself).

Starts `m3 serve` on a free loopback port, runs N concurrent clients for T seconds against
`POST /v1/embeddings` (one text per request), then encodes the same texts offline with
`m3 encode` on the same machine, and prints one JSON line: requests/s, served tokens/s,
p50/p99 latency, offline tokens/s, their ratio, and the server's resident memory after
warm-up and after the load.

    python3 scripts/bench_serve.py --m3 target/release/m3 --model DIR --clients 64 --seconds 30
"""

import argparse
import json
import random
import re
import subprocess
import threading
import time
import urllib.request


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def post(url, body):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m3", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--words", type=int, default=40, help="words per text")
    ap.add_argument("--texts", type=int, default=4096, help="distinct texts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()

    rng = random.Random(a.seed)
    vocab = ["alpha", "beta", "gamma", "delta", "river", "capital", "Paris", "fox", "jumps",
             "model", "retrieval", "dense", "sparse", "vector", "search", "token", "über",
             "北京", "数据", "la", "casa", "verde", "über", "schnell", "rápido"]
    texts = [" ".join(rng.choice(vocab) for _ in range(a.words)) for _ in range(a.texts)]

    server = subprocess.Popen(
        [a.m3, "serve", "--model", a.model, "--port", "0", "--device", a.device],
        stderr=subprocess.PIPE, text=True,
    )
    url = None
    for line in server.stderr:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        raise SystemExit("m3 serve did not start")
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
    try:
        post(url + "/v1/embeddings", {"input": texts[:8]})  # warm-up
        rss_before = rss_kib(server.pid)
        lat, tokens, served = [], [0], [0]
        lock = threading.Lock()
        deadline = time.monotonic() + a.seconds
        next_text = [0]

        def client():
            while time.monotonic() < deadline:
                with lock:
                    t = texts[next_text[0] % len(texts)]
                    next_text[0] += 1
                t0 = time.monotonic()
                r = post(url + "/v1/embeddings", {"input": t})
                dt = time.monotonic() - t0
                with lock:
                    lat.append(dt)
                    tokens[0] += r["usage"]["total_tokens"]
                    served[0] += 1

        t0 = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        rss_after = rss_kib(server.pid)
        n = served[0]
        used = texts[: min(n, len(texts))]
        per_text = tokens[0] / max(n, 1)
    finally:
        server.terminate()
        server.wait(timeout=60)

    # Offline: the same texts through `m3 encode`, model load subtracted (one-text run).
    def encode(ts):
        inp = "".join(json.dumps(t) + "\n" for t in ts)
        t0 = time.monotonic()
        subprocess.run(
            [a.m3, "encode", "--model", a.model, "--outputs", "dense", "--device", a.device,
             "--output", "/dev/null"],
            input=inp, text=True, check=True, capture_output=True,
        )
        return time.monotonic() - t0

    load_s = encode(used[:1])
    offline_s = max(encode(used) - load_s, 1e-9)
    offline_tps = per_text * len(used) / offline_s
    lat.sort()
    served_tps = tokens[0] / wall
    print(json.dumps({
        "clients": a.clients, "seconds": round(wall, 2), "requests": n,
        "requests_per_s": n / wall, "tokens_per_s": served_tps,
        "p50_s": lat[len(lat) // 2] if lat else None,
        "p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
        "offline_texts": len(used), "offline_tokens_per_s": offline_tps,
        "served_over_offline": served_tps / offline_tps,
        "rss_kib_after_warmup": rss_before, "rss_kib_after_load": rss_after,
    }))


if __name__ == "__main__":
    main()
