"""PyTorch peer for `m3 bench encode`: HF transformers XLMRobertaModel on the same weights
(the model directory from `m3 bench make-model`) and the same token ids (`--save-inputs`),
fp32, batches padded to their longest sequence as users run it, tokens/s counting real
tokens. Same thread count as m3 unless --threads says otherwise.

    python3 scripts/bench_torch.py --model DIR --inputs ids.json [--batch-size 8] [--device cpu]

`padded_batches` and `time_runs` are shared with scripts/bench_cpu_peers.py (ONNX Runtime).
"""
import argparse
import json
import os
import statistics
import time


def padded_batches(seqs, batch_size, sort):
    """Batches of `batch_size` in input order (or longest first with `sort`), each padded to
    its longest sequence with pad id 1: lists of (ids, mask) rows."""
    if sort:
        seqs = sorted(seqs, key=len, reverse=True)
    batches = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        L = max(len(s) for s in chunk)
        ids = [s + [1] * (L - len(s)) for s in chunk]
        mask = [[1] * len(s) + [0] * (L - len(s)) for s in chunk]
        batches.append((ids, mask))
    return batches


def time_runs(run, repeat):
    """One warm-up call of `run`, then the sorted wall times of `repeat` calls."""
    run()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return sorted(times)


def main():
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
    real = sum(len(s) for s in seqs)
    batches = [(torch.tensor(ids).to(a.device), torch.tensor(mask).to(a.device))
               for ids, mask in padded_batches(seqs, a.batch_size, a.sort)]
    padded = sum(b[0].numel() for b in batches)

    def run():
        with torch.inference_mode():
            for ids, mask in batches:
                model(input_ids=ids, attention_mask=mask).last_hidden_state
        if a.device != "cpu":
            torch.cuda.synchronize()

    times = time_runs(run, a.repeat)
    med = statistics.median(times)
    print(json.dumps({
        "impl": f"torch {torch.__version__} transformers XLMRobertaModel sdpa {a.dtype}",
        "device": a.device, "threads": a.threads, "batch_size": a.batch_size, "sorted": a.sort,
        "tokens": real, "padded_tokens": padded, "median_s": med, "tokens_per_s": real / med, "runs_s": times,
    }))


if __name__ == "__main__":
    main()
