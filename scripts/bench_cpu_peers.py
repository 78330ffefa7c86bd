"""ONNX Runtime peer for `m3 bench encode` on the CPU (what fastembed and bge-m3-lite run):
the same random model (from `m3 bench make-model`) exported to ONNX, timed with every graph
optimisation on and the same thread count, on the same token ids (`--save-inputs`), batches
padded to their longest as users run it. Prints one JSON line.

The graph must stay under protobuf's 2 GB, so the word-embedding table is cut to its first
--vocab rows and the ids are taken modulo that: a lookup costs the same whatever the table
size, so the timing is BGE-M3's; the outputs are not m3's (not compared here).

    python3 scripts/bench_cpu_peers.py --model DIR --inputs ids.json [--threads N] [--sort]
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch import padded_batches, time_runs  # noqa: E402


def export(model_dir, vocab, path):
    """Writes the encoder (last hidden state) with a cut vocabulary to `path` as ONNX."""
    import torch
    from transformers import XLMRobertaModel

    model = XLMRobertaModel.from_pretrained(model_dir, add_pooling_layer=False, attn_implementation="eager")
    emb = model.embeddings.word_embeddings
    cut = torch.nn.Embedding(vocab, emb.embedding_dim, padding_idx=emb.padding_idx)
    cut.weight.data.copy_(emb.weight.data[:vocab])
    model.embeddings.word_embeddings = cut
    model.config.vocab_size = vocab
    model.eval()

    class Encoder(torch.nn.Module):
        # Keyword arguments: the positional order of `forward` differs across versions.
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones((2, 16), dtype=torch.long)
    mask = torch.ones((2, 16), dtype=torch.long)
    torch.onnx.export(
        Encoder(model), (ids, mask), path, input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"], opset_version=17, dynamo=False,
        dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                      "last_hidden_state": {0: "batch", 1: "seq"}},
    )


def main():
    import numpy as np
    import onnxruntime as ort

    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--onnx", help="exported graph to reuse or write (default: MODEL/encoder-v{vocab}.onnx)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--sort", action="store_true", help="sort by length before batching (less padding)")
    a = p.parse_args()

    path = a.onnx or os.path.join(a.model, f"encoder-v{a.vocab}.onnx")
    if not os.path.exists(path):
        export(a.model, a.vocab, path)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    seqs = json.load(open(a.inputs))
    real = sum(len(s) for s in seqs)
    batches = [(np.array(ids, dtype=np.int64) % a.vocab, np.array(mask, dtype=np.int64))
               for ids, mask in padded_batches(seqs, a.batch_size, a.sort)]
    padded = sum(b[0].size for b in batches)

    def run():
        for ids, mask in batches:
            sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})

    times = time_runs(run, a.repeat)
    med = statistics.median(times)
    print(json.dumps({
        "impl": f"onnxruntime {ort.__version__} ORT_ENABLE_ALL fp32 (vocab cut to {a.vocab})",
        "device": "cpu", "threads": a.threads, "batch_size": a.batch_size, "sorted": a.sort,
        "tokens": real, "padded_tokens": padded, "median_s": med, "tokens_per_s": real / med, "runs_s": times,
    }))


if __name__ == "__main__":
    main()
