"""PyTorch peer for `m3 bench encode`: HF transformers XLMRobertaModel on the same weights
(the model directory from `m3 bench make-model`) and the same token ids (`--save-inputs`),
fp32, batches padded to their longest sequence as users run it, tokens/s counting real
tokens. Same thread count as m3 unless --threads says otherwise.

    python3 scripts/bench_torch.py --model DIR --inputs ids.json [--batch-size 8] [--device cpu]
"""
import argparse
import json
import os
import statistics
import time

import torch
from transformers import XLMRobertaModel

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--inputs", required=True)
p.add_argument("--batch-size", type=int, default=8)
p.add_argument("--repeat", type=int, default=3)
p.add_argument("--threads", type=int, default=os.cpu_count())
p.add_argument("--device", default="cpu")
p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
p.add_argument("--sort", action="store_true", help="sort by length before batching (less padding)")
a = p.parse_args()

torch.set_num_threads(a.threads)
dtype = getattr(torch, a.dtype)
model = XLMRobertaModel.from_pretrained(a.model, add_pooling_layer=False, attn_implementation="sdpa", torch_dtype=dtype)
model.eval().to(a.device)
seqs = json.load(open(a.inputs))
if a.sort:
    seqs = sorted(seqs, key=len, reverse=True)
real = sum(len(s) for s in seqs)
batches = []
for i in range(0, len(seqs), a.batch_size):
    chunk = seqs[i:i + a.batch_size]
    L = max(len(s) for s in chunk)
    ids = torch.full((len(chunk), L), 1, dtype=torch.long)  # pad id 1
    mask = torch.zeros((len(chunk), L), dtype=torch.long)
    for j, s in enumerate(chunk):
        ids[j, :len(s)] = torch.tensor(s)
        mask[j, :len(s)] = 1
    batches.append((ids.to(a.device), mask.to(a.device)))
padded = sum(b[0].numel() for b in batches)


def run():
    if a.device != "cpu":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask).last_hidden_state
    if a.device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - t


run()
times = sorted(run() for _ in range(a.repeat))
med = statistics.median(times)
print(json.dumps({
    "impl": f"torch {torch.__version__} transformers XLMRobertaModel sdpa {a.dtype}",
    "device": a.device, "threads": a.threads, "batch_size": a.batch_size, "sorted": a.sort,
    "tokens": real, "padded_tokens": padded, "median_s": med, "tokens_per_s": real / med, "runs_s": times,
}))
