"""PyTorch peer for the attention rows of `benches/gpu_ops` (issue 5): SDPA with the flash
backend, bf16, head dim 64, 16 heads, 16k tokens per batch split into sequences of 512 to
8192 (uniform lengths, so no padding), forward and backward TFLOP/s, CUDA-event timed, median
of 50 after 5 warm-ups. Counts 4*T*L*d*heads FLOPs forward (QK^T and PV), 2.5x that backward.

    python3 scripts/bench_sdpa.py
"""
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

tokens, heads, d = 16384, 16, 64


def timed(fn, warm=5, runs=50):
    for _ in range(warm):
        fn()
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


for L in (512, 2048, 8192):
    b = tokens // L
    q, k, v = (torch.randn(b, heads, L, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    flops = 4.0 * tokens * L * d * heads
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fwd = timed(lambda: F.scaled_dot_product_attention(q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        g = torch.randn_like(out)
        bwd = timed(lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True))
    print(json.dumps({"peer": "torch sdpa flash", "torch": torch.__version__, "seq": L, "heads": heads,
                      "head_dim": d, "tokens": tokens, "fwd_ms": fwd, "fwd_tflops": flops / fwd / 1e9,
                      "bwd_ms": bwd, "bwd_tflops": 2.5 * flops / bwd / 1e9}))
