"""m3's Python API against FlagEmbedding's BGEM3FlagModel.encode on the same model and texts.

Each implementation runs in its own fresh process (so peak memory is its own), on the CPU with
the same thread count, encoding the same texts with all three outputs (dense, sparse, colbert)
after one warm-up batch. Prints one JSON line per implementation: seconds (median of the
timed repeats), texts/s, peak RSS (ru_maxrss) and, for the cross-check, the largest
difference of the dense vectors between the two.

Usage (the model is any BGE-M3-shaped directory, e.g. from `m3 bench make-model`):
    python scripts/bench_python.py --model DIR [--texts 64] [--words 300] [--threads 2]
Needs: the m3 package (`pip install .`), FlagEmbedding and torch in the same interpreter.
"""

import argparse
import json
import os
import subprocess
import sys
import time


def texts(n, words):
    vocab = ("the quick brown fox jumps over a lazy dog while rivers run to the sea and "
             "mountains rise above clouds in morning light").split()
    return [" ".join(vocab[(i * 7 + k * 3) % len(vocab)] for k in range(words)) for i in range(n)]


def child(args):
    threads = str(args.threads)
    os.environ["RAYON_NUM_THREADS"] = threads
    os.environ["OMP_NUM_THREADS"] = threads
    import resource

    import numpy as np

    data = texts(args.texts, args.words)
    if args.impl == "m3":
        from m3 import BGEM3FlagModel
    else:
        import torch

        torch.set_num_threads(args.threads)
        from FlagEmbedding import BGEM3FlagModel
    t0 = time.perf_counter()
    kwargs = {"use_fp16": False}
    if args.impl == "flagembedding":
        kwargs["devices"] = "cpu"
    model = BGEM3FlagModel(args.model, **kwargs)
    load_s = time.perf_counter() - t0

    def run(batch):
        return model.encode(batch, batch_size=args.batch_size, max_length=args.max_length,
                            return_dense=True, return_sparse=True, return_colbert_vecs=True)

    run(data[: args.batch_size])
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        out = run(data)
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    np.save(args.dense_out, np.asarray(out["dense_vecs"], dtype=np.float32))
    print(json.dumps({
        "impl": args.impl, "texts": len(data), "words": args.words, "threads": args.threads,
        "load_s": round(load_s, 2), "seconds": round(med, 3),
        "all_seconds": [round(t, 3) for t in times], "texts_per_s": round(len(data) / med, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }), flush=True)


def ensure_pt_heads(model):
    """FlagEmbedding reads the heads with torch.load: write .pt copies of .safetensors heads
    (same values; m3 reads either)."""
    for stem in ["colbert_linear", "sparse_linear"]:
        pt, st = os.path.join(model, stem + ".pt"), os.path.join(model, stem + ".safetensors")
        if not os.path.exists(pt) and os.path.exists(st):
            import torch
            from safetensors.torch import load_file

            torch.save(load_file(st), pt)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--words", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--impl", choices=["m3", "flagembedding"])
    ap.add_argument("--dense-out")
    args = ap.parse_args()
    if args.impl:
        return child(args)
    import numpy as np

    ensure_pt_heads(args.model)
    dense = {}
    for impl in ["flagembedding", "m3"]:
        path = f"/tmp/bench_python_{impl}_{os.getpid()}.npy"
        cmd = [sys.executable, __file__, "--impl", impl, "--dense-out", path] + [
            a for a in sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        line = [l for l in out.stdout.splitlines() if l.startswith("{")][-1]
        print(line, flush=True)
        dense[impl] = np.load(path)
        os.remove(path)
    diff = float(np.abs(dense["m3"] - dense["flagembedding"]).max())
    print(json.dumps({"check": "dense max abs difference", "value": diff}), flush=True)


if __name__ == "__main__":
    main()
