"""PyTorch peer for `m3 bench train`: one full M3 training step (forward, backward, AdamW step)
on the same weights (the model directory from `m3 bench make-model`, with
colbert_linear.safetensors and sparse_linear.safetensors) and the same batch, timed.

The step is SPEC §5 in plain autograd around HF XLMRobertaModel (sdpa): unified fine-tuning
(dense + sparse + colbert + ensemble CE) plus self-distillation from the first step, in-batch
negatives, dropout off, grad-norm clipping 1.0, AdamW (β 0.9/0.999, eps 1e-8, weight decay on
everything but biases and LayerNorm weights; fused, as the HF Trainer's default
`adamw_torch_fused`), constant lr.

    python3 scripts/bench_torch_train.py --model DIR --inputs batch.json [--steps 5]
        [--threads N] [--device cpu|cuda] [--dtype float32|bfloat16] [--lr 1e-5] [--check]

batch.json: {"queries": [[ids]], "passages": [[ids]], "group": G, "temperature": T,
             "excluded": [ids with lexical weight 0]}; passages are B·G, each query's group
contiguous, positive first.

bfloat16 runs the encoder and the two head linears under autocast (parameters and AdamW state
stay fp32, as the HF Trainer's bf16 mode); the scores and losses are computed in fp32.

Default output: one JSON line with the median step time. --check: one JSON line with the
first-step loss and its components (8 significant digits), the pre-clipping gradient norm and
the loss of every step run (1 + --steps), for comparison against m3's.
"""
import argparse
import contextlib
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import XLMRobertaConfig, XLMRobertaModel


def pad(seqs, pad_id, device):
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[j, :len(s)] = 1
    # XLM-R positions: padding_idx + 1 + index for real tokens, padding_idx for padding.
    pos = torch.cumsum(mask, dim=1) * mask + pad_id
    return ids.to(device), mask.to(device), pos.to(device)


def lexical_weights(ids, mask, w, excluded):
    """Zero the weights of excluded ids and padding (w: [n, L] float, >= 0 after relu)."""
    keep = mask.bool() & ~torch.isin(ids, excluded)
    return w * keep.to(w.dtype)


def lexical_scores(q_ids, q_w, p_ids, p_w):
    """s_lex[a, c] = Σ_{t in q_a ∩ p_c} max_{i: q_a[i]=t} w · max_{j: p_c[j]=t} w.

    Without a [n, L, vocab] tensor: ids are renumbered into the batch's own (compact)
    vocabulary of U distinct ids, max-per-id weights are a scatter-max into [n, U] (the
    gradient goes to the arg-max occurrence), and the scores are one matmul.  Memory
    O((B + B·G) · U), U <= tokens in the batch.  Weights of excluded ids / padding are 0,
    so they add nothing.
    """
    uniq, inv = torch.unique(torch.cat([q_ids.reshape(-1), p_ids.reshape(-1)]), return_inverse=True)
    U = uniq.numel()
    q_inv = inv[:q_ids.numel()].view_as(q_ids)
    p_inv = inv[q_ids.numel():].view_as(p_ids)
    qv = torch.zeros(q_w.shape[0], U, dtype=q_w.dtype, device=q_w.device)
    qv = qv.scatter_reduce(1, q_inv, q_w, reduce="amax", include_self=True)
    pv = torch.zeros(p_w.shape[0], U, dtype=p_w.dtype, device=p_w.device)
    pv = pv.scatter_reduce(1, p_inv, p_w, reduce="amax", include_self=True)
    return qv @ pv.T


def colbert_scores(q_vecs, q_mask, p_vecs, p_mask):
    """s_mul[a, c] = Σ_i max_j <q_i, p_j> / N_a over the rows after CLS; padded passage rows
    are left out of the max (-inf), padded query rows add 0."""
    qm = q_mask[:, 1:].to(q_vecs.dtype)  # [B, Lq-1]
    pm = p_mask[:, 1:].bool()  # [P, Lp-1]
    tok = torch.einsum("aid,cjd->acij", q_vecs, p_vecs)  # [B, P, Lq-1, Lp-1]
    tok = tok.masked_fill(~pm[None, :, None, :], float("-inf"))
    best = tok.max(dim=-1).values * qm[:, None, :]  # [B, P, Lq-1]
    return best.sum(-1) / qm.sum(-1, keepdim=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--steps", type=int, default=5, help="timed steps after 1 warm-up step")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--check", action="store_true", help="print the first-step loss components")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    batch = json.load(open(a.inputs))
    queries, passages = batch["queries"], batch["passages"]
    G = int(batch["group"])
    T = float(batch["temperature"])
    B = len(queries)
    if len(passages) != B * G:
        raise SystemExit(f"{len(passages)} passages, expected B·G = {B}·{G}")
    excluded = torch.tensor(sorted(set(batch["excluded"])), dtype=torch.long, device=dev)

    config = XLMRobertaConfig.from_pretrained(a.model)
    config.hidden_dropout_prob = 0.0
    config.attention_probs_dropout_prob = 0.0
    model = XLMRobertaModel.from_pretrained(
        a.model, config=config, add_pooling_layer=False, attn_implementation="sdpa", dtype=torch.float32
    )
    pad_id = config.pad_token_id if config.pad_token_id is not None else 1
    colbert_sd = load_file(os.path.join(a.model, "colbert_linear.safetensors"))
    sparse_sd = load_file(os.path.join(a.model, "sparse_linear.safetensors"))
    colbert = torch.nn.Linear(colbert_sd["weight"].shape[1], colbert_sd["weight"].shape[0])
    sparse = torch.nn.Linear(sparse_sd["weight"].shape[1], 1)
    colbert.load_state_dict({k: v.float() for k, v in colbert_sd.items()})
    sparse.load_state_dict({k: v.float() for k, v in sparse_sd.items()})
    model.to(dev).train()
    colbert.to(dev).train()
    sparse.to(dev).train()

    named = [(n, q) for n, q in model.named_parameters()]
    named += [("colbert_linear." + n, q) for n, q in colbert.named_parameters()]
    named += [("sparse_linear." + n, q) for n, q in sparse.named_parameters()]
    params = [q for _, q in named]
    no_decay = lambda n: n.endswith(".bias") or "LayerNorm" in n  # noqa: E731
    groups = [
        {"params": [q for n, q in named if not no_decay(n)], "weight_decay": 0.01},
        {"params": [q for n, q in named if no_decay(n)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)

    q_ids, q_mask, q_pos = pad(queries, pad_id, dev)
    p_ids, p_mask, p_pos = pad(passages, pad_id, dev)
    target = torch.arange(B, device=dev) * G
    tokens = sum(len(s) for s in queries) + sum(len(s) for s in passages)
    padded = q_ids.numel() + p_ids.numel()
    if a.dtype == "bfloat16":
        autocast = lambda: torch.autocast(device_type=a.device, dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext

    def encode(ids, mask, pos):
        with autocast():
            h = model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
            w = torch.relu(sparse(h)).squeeze(-1)
            c = colbert(h[:, 1:])
        dense = F.normalize(h[:, 0].float(), dim=-1)
        w = lexical_weights(ids, mask, w.float(), excluded)
        c = F.normalize(c.float(), dim=-1) * mask[:, 1:, None].float()
        return dense, w, c

    def losses():
        qd, qw, qc = encode(q_ids, q_mask, q_pos)
        pd, pw, pc = encode(p_ids, p_mask, p_pos)
        s_d = qd @ pd.T / T
        s_s = lexical_scores(q_ids, qw, p_ids, pw) / T
        s_m = colbert_scores(qc, q_mask, pc, p_mask) / T
        s_e = s_d + 0.3 * s_s + s_m
        ce = {k: F.cross_entropy(s, target) for k, s in (("dense", s_d), ("sparse", s_s), ("colbert", s_m), ("ensemble", s_e))}
        L = (ce["dense"] + ce["ensemble"] + 0.1 * ce["sparse"] + ce["colbert"]) / 4
        teacher = torch.softmax(s_e, dim=-1).detach()
        kd = {k: -(teacher * torch.log_softmax(s, dim=-1)).sum(-1).mean() for k, s in (("dense", s_d), ("sparse", s_s), ("colbert", s_m))}
        Lp = (kd["dense"] + 0.1 * kd["sparse"] + kd["colbert"]) / 3
        loss = (L + Lp) / 2
        parts = {"ce": {k: v.detach() for k, v in ce.items()}, "L": L.detach(),
                 "kd": {k: v.detach() for k, v in kd.items()}, "distill": Lp.detach()}
        return loss, parts

    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize()

    def step():
        sync()
        t0 = time.perf_counter()
        loss, parts = losses()
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0, loss.detach(), parts, gnorm

    _, first_loss, first_parts, first_gnorm = step()
    times, step_losses = [], [float(first_loss)]
    for _ in range(a.steps):
        t, loss, _, _ = step()
        times.append(t)
        step_losses.append(float(loss))

    g8 = lambda x: float(f"{float(x):.8g}")  # noqa: E731
    if a.check:
        print(json.dumps({
            "peer": "torch", "device": a.device, "dtype": a.dtype, "lr": a.lr,
            "loss": g8(first_loss),
            "ce_dense": g8(first_parts["ce"]["dense"]), "ce_sparse": g8(first_parts["ce"]["sparse"]),
            "ce_colbert": g8(first_parts["ce"]["colbert"]), "ce_ensemble": g8(first_parts["ce"]["ensemble"]),
            "loss_ce": g8(first_parts["L"]),
            "kd_dense": g8(first_parts["kd"]["dense"]), "kd_sparse": g8(first_parts["kd"]["sparse"]),
            "kd_colbert": g8(first_parts["kd"]["colbert"]), "distill": g8(first_parts["distill"]),
            "grad_norm": g8(first_gnorm), "losses": [g8(x) for x in step_losses],
        }))
        return
    med = statistics.median(times) if times else float("nan")
    print(json.dumps({
        "peer": "torch", "torch": torch.__version__, "threads": a.threads, "device": a.device,
        "dtype": a.dtype, "first_loss": float(first_loss), "step_s_median": med, "step_s_all": times,
        "tokens": tokens, "padded_tokens": padded, "tokens_per_s": tokens / med,
        "batch": B, "group": G, "lr": a.lr,
    }))


if __name__ == "__main__":
    main()
