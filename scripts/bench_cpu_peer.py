"""CPU peer for benches/ops.rs: the same shapes in numpy (OpenBLAS matmul, vectorised
LayerNorm). Median of 50 runs. Usage: python3 scripts/bench_cpu_peer.py"""
import time

import numpy as np


def median_ms(f, runs=50):
    f()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


rng = np.random.default_rng(1)
x = rng.uniform(-1, 1, (512, 768)).astype(np.float32)
w = rng.uniform(-1, 1, (768, 768)).astype(np.float32)
b = rng.uniform(-1, 1, 768).astype(np.float32)
g = rng.uniform(-1, 1, 768).astype(np.float32)


def layernorm():
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + 1e-5) * g + b


print(f"numpy {np.__version__}")
print(f"numpy linear 512x768 -> 768 +bias: {median_ms(lambda: x @ w.T + b):.3f} ms")
print(f"numpy layernorm 512x768:           {median_ms(layernorm):.3f} ms")
