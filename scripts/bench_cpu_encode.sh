#!/usr/bin/env bash
# Side-by-side CPU encode throughput: m3 vs HF transformers (scripts/bench_torch.py) and
# ONNX Runtime (scripts/bench_cpu_peers.py) on the same random BGE-M3-shaped model and the
# same token ids, same thread count. Needs torch + transformers + onnx + onnxruntime in
# $PYTHON (default python3). Prints one JSON line per implementation and shape.
#   scripts/bench_cpu_encode.sh MODEL_DIR   (make it with: m3 bench make-model --out MODEL_DIR)
set -euo pipefail
model="${1:?usage: bench_cpu_encode.sh MODEL_DIR}"
py="${PYTHON:-python3}"
m3="${M3:-target/release/m3}"
threads="$(nproc)"
tmp="$(mktemp -d)"
for spec in uniform:128:2048 uniform:512:2048 uniform:2048:4096 mixed:16-2048:6144; do
  lengths="${spec%:*}"; tokens="${spec##*:}"
  "$m3" bench encode --device cpu --model "$model" --lengths "$lengths" --tokens "$tokens" \
    --repeat 3 --save-inputs "$tmp/ids.json"
  "$py" scripts/bench_torch.py --model "$model" --inputs "$tmp/ids.json" --threads "$threads" --repeat 3 2>/dev/null
  "$py" scripts/bench_cpu_peers.py --model "$model" --inputs "$tmp/ids.json" --threads "$threads" --repeat 3 2>/dev/null
  if [ "${lengths%%:*}" = mixed ]; then
    "$py" scripts/bench_torch.py --model "$model" --inputs "$tmp/ids.json" --threads "$threads" --repeat 3 --sort 2>/dev/null
    "$py" scripts/bench_cpu_peers.py --model "$model" --inputs "$tmp/ids.json" --threads "$threads" --repeat 3 --sort 2>/dev/null
  fi
done
rm -rf "$tmp"
